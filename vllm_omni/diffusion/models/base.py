"""What the diffusion runner needs from a model family, and the flow-matching logic the families share.

A family wraps a diffusers pipeline loaded from a ``model_index.json`` folder and uses its components and
helpers (text encoders via ``encode_prompt``, ``prepare_latents``, the VAE and image processor), but the
runner owns the denoising loop: each request keeps its own sampler (a fresh diffusers scheduler), its own
generator and latents, so requests at different steps, with different step counts, guidance scales and
seeds share one transformer forward pass. Inpainting is per request too: after each of its steps a masked
request puts its init image back where the mask keeps it (``Inpainting``), whatever its batch holds.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from vllm_omni.diffusion.cache_manager import value_nbytes
from vllm_omni.diffusion.latents import denoising_range
from vllm_omni.diffusion.prompt_embeds import EMBEDS_KEYS, SIDES, Shape, checked_embeds
from vllm_omni.diffusion.request import DiffusionRequest


@dataclass
class Inpainting:
    """An inpainting request's blend: the rule of diffusers' inpaint pipelines for a transformer that takes
    plain latents (SD3's 16 channels, Z-Image), done per request after each of its sampler steps."""

    mask: torch.Tensor
    """``(1, 1, h, w)`` at latent size: 1 where the request repaints, 0 where it keeps the init image."""
    image_latents: torch.Tensor
    """The init image's clean latents."""
    noise: torch.Tensor
    """The noise the initial latents were made with (the kept area is noised with it again)."""

    def blend(self, latents: torch.Tensor, sampler: Any, next_timestep: torch.Tensor) -> torch.Tensor:
        """``latents`` where the mask repaints; elsewhere the init image noised to ``next_timestep`` (one
        element; empty after the last step: the clean image) by the request's ``sampler``."""
        kept = self.image_latents
        if len(next_timestep):
            kept = sampler.scale_noise(kept, next_timestep, self.noise)
        return self.mask * latents + (1 - self.mask) * kept

    def tensors(self) -> list[torch.Tensor]:
        """The tensors it holds (counted in the request's state bytes)."""
        return [self.mask, self.image_latents, self.noise]


@dataclass
class DenoiseState:
    """The tensors and sampler of one request while it is in the running batch."""

    request: DiffusionRequest
    generator: torch.Generator
    sampler: Any
    """The request's own diffusers scheduler (holds its step index)."""
    timesteps: torch.Tensor
    latents: torch.Tensor
    cond: Any
    """Conditioning of the prompt (family-specific tensors)."""
    uncond: Any = None
    """Conditioning of the negative prompt when guidance is on."""
    step_index: int = 0
    started: float = field(default_factory=time.monotonic)
    """When the request joined the running batch."""
    step_cache: dict[str, Any] = field(default_factory=dict)
    """Per-request memory of the step cache (residuals of the last computed step)."""
    inpainting: Inpainting | None = None
    """What an inpainting request blends back in after each step; None for the others."""

    @property
    def finished(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]

    def nbytes(self) -> int:
        """Bytes of the tensors this state holds."""
        inpainting = None if self.inpainting is None else self.inpainting.tensors()
        tensors = [self.latents, self.timesteps, self.cond, self.uncond, self.step_cache, inpainting]
        return value_nbytes(tensors)


def denoise_rows(states: list[DenoiseState]) -> list[tuple[DenoiseState, Any, dict[str, Any]]]:
    """Transformer batch rows of ``states``: (state, conditioning, step-cache memory), conditional row first,
    then the unconditional one for guided requests."""
    rows = []
    for s in states:
        rows.append((s, s.cond, s.step_cache.setdefault("cond", {})))
        if s.uncond is not None:
            rows.append((s, s.uncond, s.step_cache.setdefault("uncond", {})))
    return rows


class DiTFamily:
    """A native model family. Subclasses set the class attributes and implement the abstract methods."""

    name: str
    pipeline_classes: tuple[str, ...]
    """``_class_name`` values in ``model_index.json`` this family serves."""
    samplers: tuple[str, ...]
    """Diffusers scheduler classes a request may pick."""
    blocks_attr: str
    """Attribute of the transformer holding its block list (where the step cache goes)."""
    compiled_block_lists: tuple[str, ...]
    """Attributes of the transformer holding its repeated block lists (what ``DiTConfig.compile``
    compiles, as the transformer's own ``_repeated_blocks`` would name them)."""
    embeds_keys: tuple[str, ...] = ("prompt_embeds",)
    """Prompt keys of the tensors ``encode`` makes of one text, in order (``negative_`` + key: the negative
    prompt's); the pipeline's ``__call__`` arguments of the same names."""
    embeds_as_list: bool = False
    """The pipeline's ``__call__`` takes them as lists of per-prompt tensors (else as batch tensors)."""

    def __init__(self, pipe: Any, device: str, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.transformer = pipe.transformer
        call = inspect.signature(type(pipe).__call__).parameters
        self.default_steps: int = call["num_inference_steps"].default
        self.default_guidance: float = call["guidance_scale"].default
        self.max_sequence_length: int = call["max_sequence_length"].default

    # ---- model facts -------------------------------------------------------------------------------
    @property
    def size_factor(self) -> int:
        """Image height and width must be multiples of this."""
        raise NotImplementedError

    @property
    def default_size(self) -> int:
        raise NotImplementedError

    @property
    def max_size(self) -> int | None:
        """Largest image height and width the model takes; None: no limit of its own."""
        return None

    warm_up_captions: tuple[str, ...] = ("",)
    """Captions of the compile warm-up's requests: each bucket runs a batch of the first, then one ending in
    each other caption (a family whose graphs differ for rows of mixed caption lengths names a long one)."""

    @property
    def warm_up_size(self) -> int | None:
        """Image height and width the compile warm-up runs at; None: the stage's default size. Where the
        first size compiles graphs static in it (dynamo's automatic dynamic shapes), that should be the size
        most requests ask for."""
        return None

    def compiled_block_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A compiled block's arguments as its graphs take them, after batch padding (default: as given).
        A family whose block inputs change shape or kind from request to request makes them uniform here,
        so that one compiled graph per batch bucket serves them all."""
        return args, kwargs

    def guidance_on(self, guidance_scale: float) -> bool:
        """Whether this scale means classifier-free guidance (a negative-prompt pass) for this family."""
        raise NotImplementedError

    def batch_key(self, request: DiffusionRequest) -> Any:
        """Requests with equal keys can share a forward pass (default: same latent shape)."""
        return (request.height, request.width)

    @property
    def encoder_id(self) -> str:
        """Identity of the text encoder(s), part of conditioning-cache keys."""
        return f"{self.name}:{self.pipe.name_or_path}:{self.max_sequence_length}"

    # ---- per-request preparation -------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[Any]:
        """Conditioning of each text (batched through the pipeline's own ``encode_prompt``)."""
        raise NotImplementedError

    def given_conditioning(self, parsed: dict[str, Any]) -> tuple[Any, Any]:
        """Conditioning of the prompt and of the negative prompt given as tensors in ``parsed`` (a parsed
        prompt; None where text was given instead), in ``encode``'s form, checked and cast.

        Raises ``ValueError`` naming the key and what this family accepts.
        """
        allowed = [side + key for side in SIDES for key in self.embeds_keys]
        for key in EMBEDS_KEYS:
            if parsed.get(key) is not None and key not in allowed:
                raise ValueError(f"{key} is not used by {self.name}; its tensor keys are {allowed}")
        return self._given(parsed, ""), self._given(parsed, "negative_")

    def _given(self, parsed: dict[str, Any], side: str) -> Any:
        keys = [side + key for key in self.embeds_keys]
        if parsed.get(keys[0]) is None:
            return None
        missing = [key for key in keys if parsed.get(key) is None]
        if missing:
            raise ValueError(f"{self.name} takes {keys} together; {missing} missing")
        return self.conditioning_from_embeds([parsed[key] for key in keys], keys)

    def conditioning_from_embeds(self, tensors: list[Any], keys: list[str]) -> Any:
        """``encode``'s conditioning of one text from the tensors given under ``keys`` (checked and cast)."""
        raise NotImplementedError

    def embeds_of(self, conditioning: Any) -> list[torch.Tensor]:
        """The tensors of ``conditioning``, in ``embeds_keys`` order (undoes ``conditioning_from_embeds``)."""
        raise NotImplementedError

    def _checked(self, key: str, value: Any, shape: Shape) -> torch.Tensor:
        return checked_embeds(key, value, shape, self.name, self.device, self.dtype)

    def make_sampler(self, name: str) -> Any:
        """A fresh scheduler of class ``name`` with the folder's scheduler configuration."""
        import diffusers

        return getattr(diffusers, name).from_config(self.pipe.scheduler.config)

    def set_timesteps(self, sampler: Any, request: DiffusionRequest) -> torch.Tensor:
        """Full schedule of ``request`` on its sampler."""
        raise NotImplementedError

    def latent_dtype(self) -> torch.dtype:
        return self.dtype

    def num_latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one request's latents at ``height`` x ``width`` (what ``prepare_latents`` makes and the
        stage returns): ``(1, channels, height / vae_scale_factor, width / vae_scale_factor)``."""
        factor = self.pipe.vae_scale_factor
        return (1, self.num_latent_channels(), height // factor, width // factor)

    def latents_size(self, latents: Any) -> tuple[int | None, int | None]:
        """(height, width) of an image whose latents are ``latents`` (None, None: not a 4-D tensor)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            return None, None
        factor = self.pipe.vae_scale_factor
        return latents.shape[-2] * factor, latents.shape[-1] * factor

    def given_latents(self, latents: Any, height: int, width: int) -> torch.Tensor:
        """``latents`` checked (a finite floating-point tensor of ``latent_shape``) and copied to the model's
        device in the latent dtype; ``ValueError`` naming ``latents`` and the shape expected."""
        where = f"{self.name} at {width}x{height} (WxH)"
        return checked_embeds("latents", latents, self.latent_shape(height, width), where, self.device,
                              self.latent_dtype())  # fmt: skip

    def step_range(self, request: DiffusionRequest) -> tuple[int, int]:
        """``[begin, end)`` of the full schedule ``request`` runs: from ``strength``'s start (image-to-image,
        diffusers' rule) or the ``denoising_start`` cut to the ``denoising_end`` cut
        (``vllm_omni.diffusion.latents``). ``ValueError`` when the cuts leave no step or would split the
        steps of a second-order sampler."""
        sampler = self.make_sampler(request.sampler)
        timesteps = self.set_timesteps(sampler, request)
        start, end = request.denoising_start, request.denoising_end
        if start is None and end is None:
            return self._strength_start(sampler, request), len(timesteps)
        if sampler.order != 1:
            raise ValueError(
                f"denoising_start / denoising_end: {request.sampler} is a second-order sampler (two "
                "timesteps per step) and a cut would split a step; use a first-order sampler"
            )
        begin, stop = denoising_range(timesteps, sampler.config.num_train_timesteps, start, end)
        begin = max(begin, self._strength_start(sampler, request))  # strength and denoising_start exclude
        if begin >= stop:
            raise ValueError(
                f"denoising_start {start} / denoising_end {end} leave no step of the "
                f"{request.num_inference_steps}-step schedule (steps {begin}..{stop}); widen the range"
            )
        return begin, stop

    def prepare(self, request: DiffusionRequest, cond: Any, uncond: Any) -> DenoiseState:
        """Sampler, schedule (``step_range`` of it) and initial latents of ``request``: fresh noise, the given
        latents, or (image-to-image) the init image's or given clean latents noised to the first step;
        inpainting: also its blend."""
        generator = torch.Generator("cpu").manual_seed(request.seed)
        sampler = self.make_sampler(request.sampler)
        given, request.latents = request.latents, None  # the state owns them: one copy while it denoises
        begin, end = request.step_range
        timesteps = self.set_timesteps(sampler, request)[begin:end]
        sampler.set_begin_index(begin)
        if request.strength is None:
            latents = given
            if latents is None:
                latents = self.pipe.prepare_latents(
                    1, self.num_latent_channels(), request.height, request.width,
                    self.latent_dtype(), self.device, generator,
                )  # fmt: skip
            return DenoiseState(request, generator, sampler, timesteps, latents, cond, uncond)
        clean = given if given is not None else self._image_latents(request, generator)
        device, dtype = torch.device(self.device), clean.dtype
        noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
        latents = sampler.scale_noise(clean, timesteps[:1], noise).to(self.latent_dtype())
        state = DenoiseState(request, generator, sampler, timesteps, latents, cond, uncond)
        if request.mask_image is not None:
            state.inpainting = Inpainting(self._latent_mask(request, latents), clean, noise)
        return state

    def image_to_image_steps(self, request: DiffusionRequest) -> int:
        """Steps an image-to-image request runs: ``strength`` of its schedule (diffusers' rule)."""
        init = min(request.num_inference_steps * request.strength, request.num_inference_steps)
        return request.num_inference_steps - int(max(request.num_inference_steps - init, 0))

    def _strength_start(self, sampler: Any, request: DiffusionRequest) -> int:
        if request.strength is None:
            return 0
        return (request.num_inference_steps - self.image_to_image_steps(request)) * sampler.order

    def _image_latents(self, request: DiffusionRequest, generator: torch.Generator) -> torch.Tensor:
        """The init image's latents (the VAE samples with the request's generator)."""
        processor = self.pipe.image_processor
        image = processor.preprocess(request.image, height=request.height, width=request.width)
        image = image.to(device=self.device, dtype=self.latent_dtype())
        vae = self.pipe.vae
        init = retrieve_latents(vae.encode(image), generator=generator)
        return (init - vae.config.shift_factor) * vae.config.scaling_factor

    @functools.cached_property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks read as diffusers' inpaint pipelines read them: grayscale, resized to the request's size,
        binarized (>= 0.5: repaint), not normalized."""
        config = self.pipe.image_processor.config
        return VaeImageProcessor(
            vae_scale_factor=config.vae_scale_factor, vae_latent_channels=config.vae_latent_channels,
            do_normalize=False, do_binarize=True, do_convert_grayscale=True,
        )  # fmt: skip

    def _latent_mask(self, request: DiffusionRequest, latents: torch.Tensor) -> torch.Tensor:
        """The request's mask at latent size (nearest neighbour, as diffusers downsamples it)."""
        mask = self.mask_processor.preprocess(request.mask_image, height=request.height, width=request.width)
        mask = torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]))
        return mask.to(device=self.device, dtype=self.latent_dtype())

    # ---- the batched step --------------------------------------------------------------------------
    def predict(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        """Guided model output of each state at its current timestep, in one transformer forward."""
        raise NotImplementedError

    def step(self, state: DenoiseState, model_output: torch.Tensor) -> None:
        """Advance ``state`` by one step of its sampler."""
        takes_generator = _accepts(type(state.sampler).step, "generator")
        kwargs = {"generator": state.generator} if takes_generator else {}
        state.latents = state.sampler.step(
            model_output, state.timestep, state.latents, return_dict=False, **kwargs
        )[0]
        state.step_index += 1
        if state.inpainting is not None:
            next_timestep = state.timesteps[state.step_index : state.step_index + 1]
            state.latents = state.inpainting.blend(state.latents, state.sampler, next_timestep)

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Images of a batch of final latents of one shape."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


@functools.cache
def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters
