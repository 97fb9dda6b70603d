"""Requests and outputs of a diffusion (DiT) stage."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_omni.config.utils import from_known_keys
from vllm_omni.diffusion.prompt_embeds import EMBEDS_KEYS, SIDES

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_PARTIAL_IMAGES = 3
PROMPT_KEYS = ("prompt", "negative_prompt", "image", "mask_image", "latents", *EMBEDS_KEYS)


@dataclass
class DiffusionSamplingParams:
    """Per-request parameters of a DiT stage; ``None``: the stage's default (``DiTConfig``, then the model's).

    A request is image-to-image when its prompt carries an ``image``; ``strength`` (0, 1] then sets how much
    of the schedule runs (1 = all of it, the init image only seeds the noise). With a ``mask_image`` too it
    is inpainting: only the mask's white areas are repainted. A prompt's ``latents`` start the denoising
    instead of fresh noise; ``denoising_start`` / ``denoising_end`` cut the schedule, diffusers' ensemble
    of expert denoisers (``vllm_omni.diffusion.latents``).
    """

    height: int | None = None
    """Image height in pixels (image-to-image: defaults to the init image's)."""
    width: int | None = None
    """Image width in pixels (image-to-image: defaults to the init image's)."""
    num_inference_steps: int | None = None
    """Denoising steps of the full schedule."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (the model family decides which values switch guidance off)."""
    seed: int | None = None
    """Seed of the request's own generator (noise, VAE sampling, stochastic samplers); random if None."""
    strength: float | None = None
    """Image-to-image only (an init ``image``, or clean ``latents``): share of the schedule to run, in (0, 1]
    (default 0.6 with an image; with latents, unset means they are not noised: see ``denoising_start``)."""
    denoising_start: float | None = None
    """With the prompt's ``latents``: share of the schedule already run on them, in [0, 1); the request runs
    the timesteps after that cut (diffusers' ``denoising_start``) on the latents as they are. Unset: 0."""
    denoising_end: float | None = None
    """Share of the schedule to run, in (0, 1]: the request stops at that cut and returns the latents
    partly denoised (diffusers' ``denoising_end``), for a later ``denoising_start`` to continue."""
    sampler: str | None = None
    """Diffusers scheduler class name for this request (must be one the model family supports)."""
    output_type: str = "pil"
    """``pil`` (list of PIL images), ``np`` (float array in [0, 1], NHWC) or ``latent`` (no VAE decode)."""
    return_latents: bool = False
    """Also return the final latents (CPU tensor)."""
    partial_images: int = 0
    """Previews to report while the request denoises (0-3): the image decoded from the latents so far, at
    evenly spaced steps, each as an output with ``partial_image_index`` before the final one."""

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_inference_steps", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        guidance = self.guidance_scale
        if guidance is not None and not (_is_number(guidance) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.strength is not None and not (_is_number(self.strength) and 0 < self.strength <= 1):
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        self._check_denoising_window()
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {self.output_type!r}")
        partial = self.partial_images
        if isinstance(partial, bool) or not (isinstance(partial, int) and 0 <= partial <= MAX_PARTIAL_IMAGES):
            raise ValueError(
                f"partial_images must be an integer in [0, {MAX_PARTIAL_IMAGES}], got {self.partial_images!r}"
            )

    def _check_denoising_window(self) -> None:
        start, end = self.denoising_start, self.denoising_end
        if start is not None and not (_is_number(start) and 0 <= start < 1):
            raise ValueError(f"denoising_start must be in [0, 1), got {start!r}")
        if end is not None and not (_is_number(end) and 0 < end <= 1):
            raise ValueError(f"denoising_end must be in (0, 1], got {end!r}")
        if start is not None and end is not None and start >= end:
            raise ValueError(f"denoising_start ({start}) must be below denoising_end ({end})")
        if start is not None and self.strength is not None:
            raise ValueError(
                "denoising_start and strength both say where the schedule starts (given latents as they are, "
                "or clean latents noised to strength); give one"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiffusionSamplingParams:
        """Build from a plain dict, naming any unknown key."""
        return from_known_keys(cls, values, "unknown diffusion sampling parameter(s)")


@dataclass
class DiffusionRequest:
    """A validated request as the scheduler sees it: parameters resolved, nothing left to default."""

    request_id: str
    prompt: str | None
    """None when the prompt's conditioning came as tensors (``prompt_embeds``)."""
    negative_prompt: str | None
    image: Any
    """Init image (PIL image, or float tensor CHW/NCHW in [0, 1]) for image-to-image, else None."""
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    strength: float | None
    """Image-to-image: share of the schedule to run from the noised init image or clean ``latents``; None:
    nothing is noised (text-to-image, or ``latents`` continued as they are)."""
    sampler: str
    output_type: str
    return_latents: bool
    partial_images: int = 0
    """Previews to report while denoising (see ``DiffusionSamplingParams.partial_images``)."""
    mask_image: Any = None
    """Inpainting mask of the init image (diffusers' convention: white, >= 0.5, is repainted, black kept; the
    image's size), else None."""
    prompt_embeds: Any = None
    """The prompt's conditioning given as tensors, in the family's ``encode`` form for one text (checked, on
    the model's device and dtype); used instead of encoding ``prompt``."""
    negative_prompt_embeds: Any = None
    """The same for the negative prompt (used when guidance is on; else ``negative_prompt`` is encoded)."""
    latents: Any = None
    """Latents to start from instead of fresh noise (checked, on the model's device, in the family's latent
    dtype): noised to ``strength`` when it is set, else continued as they are. None again once the request's
    denoising state has taken them (one copy while it runs)."""
    denoising_start: float | None = None
    """Share of the schedule already run on ``latents`` (see ``DiffusionSamplingParams``)."""
    denoising_end: float | None = None
    """Share of the schedule to run before returning the latents (see ``DiffusionSamplingParams``)."""
    step_range: tuple[int, int] | None = None
    """``[begin, end)`` of the full schedule's timesteps the request runs (set by the native family; None:
    all of them)."""
    batch_key: Any = None
    """Requests with equal keys can share a transformer forward pass (set by the model family)."""
    arrival_time: float = field(default_factory=time.monotonic)

    def nbytes(self) -> int:
        """Bytes of the data this request holds: its conditioning tensors, latents, init image and mask."""
        from vllm_omni.diffusion.cache_manager import value_nbytes  # torch: only where requests hold tensors

        images = _image_nbytes(self.image) + _image_nbytes(self.mask_image)
        return value_nbytes([self.prompt_embeds, self.negative_prompt_embeds, self.latents]) + images


@dataclass
class DiffusionOutput:
    """What a DiT stage returns for one request: its previews (``partial_image_index`` set), then once when
    it finished, failed or was aborted."""

    request_id: str
    images: Any = None
    """List of PIL images (``pil``), float array NHWC in [0, 1] (``np``), or None (``latent``, errors)."""
    latents: Any = None
    """Final latents (CPU tensor) when asked for (``return_latents`` or ``output_type="latent"``)."""
    seed: int | None = None
    """The seed the request's generator used (reproduces the image)."""
    num_steps: int = 0
    """Denoising steps actually run (image-to-image runs ``strength`` of the schedule, a cut schedule the
    timesteps between ``denoising_start`` and ``denoising_end``)."""
    error: str | None = None
    """Why the request failed; None when it succeeded."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Timings in seconds: ``queue`` (arrival to first step) and ``total`` (arrival to output)."""
    partial_image_index: int | None = None
    """For a preview: which one (0, 1, ...; ``images`` hold the image decoded from the latents so far);
    None for the request's final output."""


def parse_prompt(prompt: Any) -> dict[str, Any]:
    """Normalise a prompt: a string, or a dict with ``prompt`` and/or ``prompt_embeds``, ``negative_prompt``
    or ``negative_prompt_embeds``, ``image`` and its inpainting ``mask_image`` (and SD3's
    ``pooled_prompt_embeds``, ``negative_pooled_...``), or ``latents`` to start from (instead of an image).

    As in diffusers' pipelines, a text and its tensors are exclusive (``prompt`` or ``prompt_embeds``, not
    both); the tensors themselves are checked by the model family.
    """
    if isinstance(prompt, str):
        return {key: None for key in PROMPT_KEYS} | {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise ValueError(f"a DiT prompt must be a str or a dict, got {type(prompt).__name__}")
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"unknown DiT prompt key(s) {unknown}; allowed: {list(PROMPT_KEYS)}")
    for key in ("prompt", "negative_prompt"):
        if prompt.get(key) is not None and not isinstance(prompt[key], str):
            raise ValueError(f"{key} must be a string, got {type(prompt[key]).__name__}")
    for side in SIDES:
        text, embeds, pooled = f"{side}prompt", f"{side}prompt_embeds", f"{side}pooled_prompt_embeds"
        if prompt.get(text) is not None and prompt.get(embeds) is not None:
            raise ValueError(f"give {text} or {embeds}, not both")
        if prompt.get(pooled) is not None and prompt.get(embeds) is None:
            raise ValueError(f"{pooled} is only taken together with {embeds}")
    if prompt.get("prompt") is None and prompt.get("prompt_embeds") is None:
        raise ValueError("prompt (a string) or prompt_embeds (tensors) is required")
    if prompt.get("latents") is not None and prompt.get("image") is not None:
        raise ValueError("give image or latents (the start of the denoising), not both")
    if prompt.get("mask_image") is not None and prompt.get("image") is None:
        raise ValueError("mask_image masks the init image: pass the image as prompt['image'] too")
    return {key: prompt.get(key) for key in PROMPT_KEYS}


def _image_nbytes(image: Any) -> int:
    """A PIL image: one byte per band and pixel; a tensor or an array: its buffer; nothing else is counted."""
    if hasattr(image, "getbands"):
        return image.width * image.height * len(image.getbands())
    return getattr(image, "nbytes", 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
