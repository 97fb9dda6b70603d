"""Drives the denoising loop of a native DiT family for a running batch of requests.

The runner loads the diffusers folder with diffusers' classes, turns validated requests into denoising
states (text encoding through the conditioning cache, per-request noise and sampler), runs one denoising
step per scheduler group in one transformer forward pass, and decodes finished latents in batches. It
learns which requests ended only from the scheduler output (``finished_req_ids``) and frees their states
there, in one place.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import torch

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.cache_manager import DiTCacheManager, conditioning_key
from vllm_omni.diffusion.compiled_blocks import CompiledBlocks, compile_unavailable, inductor_cache_dir
from vllm_omni.diffusion.images import check_mask, image_size
from vllm_omni.diffusion.limits import DiTLimits
from vllm_omni.diffusion.models import DenoiseState, resolve_family
from vllm_omni.diffusion.models.base import denoise_rows
from vllm_omni.diffusion.request import (
    DiffusionOutput,
    DiffusionRequest,
    DiffusionSamplingParams,
    parse_prompt,
)
from vllm_omni.diffusion.step_cache import FirstBlockCache
from vllm_omni.logger import init_logger
from vllm_omni.transformers_utils.model_resolution import diffusers_folder, pipeline_class_name

if TYPE_CHECKING:
    from vllm_omni.v1.core.sched.diffusion_scheduler import DiffusionSchedulerOutput

logger = init_logger(__name__)

DEFAULT_STRENGTH = 0.6  # diffusers' image-to-image default


class OmniDiffusionModelRunner:
    """Model, conditioning cache and per-request denoising states of one DiT stage."""

    def __init__(self, model_path: str, config: DiTConfig) -> None:
        """``model_path``: a diffusers folder or hub repo id (at ``config.revision``)."""
        from diffusers import DiffusionPipeline

        self.config = config
        folder = diffusers_folder(model_path, config.revision)
        family_cls = resolve_family(pipeline_class_name(folder), config.model_type)
        device, dtype = config.torch_device(), config.torch_dtype()
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if config.attention_backend == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        self.family = family = family_cls(pipe, device, dtype)
        self.limits = DiTLimits.from_config(
            config,
            family.name,
            family.size_factor,
            family.samplers,
            step_level=True,
            model_max_size=family.max_size,
            inpainting=True,  # every native family blends as diffusers' inpaint pipelines do (models/base.py)
        )
        """What this stage accepts (the checks of ``make_request`` that need no model)."""
        self.default_sampler = config.scheduler or type(pipe.scheduler).__name__
        self.limits.check_sampler(self.default_sampler, "DiTConfig.scheduler")
        cache = config.cache
        self.conditioning_cache = DiTCacheManager(
            cache.conditioning_cache_bytes, cache.conditioning_cache_policy
        )
        self.compiled = self._compiled_blocks()
        """The compiled transformer blocks (``DiTConfig.compile``); None: the blocks run eagerly."""
        self.step_cache = None
        if cache.step_cache == "first_block":
            transformer = self.family.transformer
            self.step_cache = FirstBlockCache(
                transformer, self.family.blocks_attr, cache.step_cache_threshold
            )
        self.states: dict[str, DenoiseState] = {}

    def _compiled_blocks(self) -> CompiledBlocks | None:
        if not self.config.compile_on():
            return None
        unavailable = compile_unavailable(self.family.device)
        if unavailable is not None:
            logger.warning("DiT stage: transformer blocks run eagerly: %s (DiTConfig.compile=%r)",
                           unavailable, self.config.compile)  # fmt: skip
            return None
        rows = 2 * self.config.max_batch_size  # guided requests take two rows
        family = self.family
        blocks = family.compiled_block_lists
        return CompiledBlocks(family.transformer, blocks, rows, family.compiled_block_args)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the blocks for every bucket now (forwards of each batch size at the family's warm-up size,
        else the stage's default image size, with its warm-up captions), logging the time; where compiling
        fails, run the blocks eagerly and warn."""
        if self.compiled is None:
            return
        started, family = time.monotonic(), self.family
        size = family.warm_up_size
        params = DiffusionSamplingParams(
            height=size, width=size, num_inference_steps=1, guidance_scale=0.0, seed=0
        )
        captions = family.warm_up_captions
        conditioning = self._conditioning(list(captions))
        requests = [self.make_request("warm-up", caption, params) for caption in captions]
        first, *others = [family.prepare(r, *self._conditioning_of(r, conditioning)) for r in requests]
        try:
            for rows in self.compiled.buckets:
                for batch in _warm_up_batches(first, others, rows):
                    family.predict(batch)
        except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
            self.compiled.disable()
            self.compiled = None
            logger.warning("DiT stage: compiling the transformer blocks failed, they run eagerly (%s: %s)",
                           type(exc).__name__, exc)  # fmt: skip
            return
        logger.info("DiT stage: compiled transformer blocks warmed up for batch sizes %s at %dx%d in %.1f s "
                    "(inductor cache %s)", list(self.compiled.buckets), requests[0].width, requests[0].height,
                    time.monotonic() - started, inductor_cache_dir())  # fmt: skip

    # ---- validation --------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: Any, params: DiffusionSamplingParams) -> DiffusionRequest:
        """Validate ``prompt`` and ``params`` against the model and resolve every default."""
        parsed = parse_prompt(prompt)
        image, mask, latents = parsed["image"], parsed["mask_image"], parsed["latents"]
        family, config = self.family, self.config
        height, width = self._size(params, image, latents)
        self.limits.check_request(
            params,
            image is not None,
            height,
            width,
            has_mask=mask is not None,
            has_latents=latents is not None,
        )
        if mask is not None:
            check_mask(mask, image)
        steps = _first(params.num_inference_steps, config.num_inference_steps, family.default_steps)
        guidance = float(_first(params.guidance_scale, config.guidance_scale, family.default_guidance))
        cond, uncond = family.given_conditioning(parsed)
        request = DiffusionRequest(
            request_id=request_id,
            prompt=parsed["prompt"],
            negative_prompt=parsed["negative_prompt"] or "",
            image=image,
            mask_image=mask,
            prompt_embeds=cond,
            negative_prompt_embeds=uncond if family.guidance_on(guidance) else None,
            latents=None if latents is None else family.given_latents(latents, height, width),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            strength=_first(params.strength, DEFAULT_STRENGTH) if image is not None else params.strength,
            denoising_start=params.denoising_start,
            denoising_end=params.denoising_end,
            sampler=params.sampler or self.default_sampler,
            output_type=params.output_type,
            return_latents=params.return_latents,
            partial_images=params.partial_images,
        )
        request.step_range = begin, end = family.step_range(request)
        if params.partial_images >= end - begin:
            raise ValueError(
                f"partial_images {params.partial_images} must be fewer than the steps ({end - begin})"
            )
        request.batch_key = family.batch_key(request)
        return request

    def _size(self, params: DiffusionSamplingParams, image: Any, latents: Any) -> tuple[int, int]:
        """(height, width) of a request: asked for, else the stage's, else the init image's, else the model's;
        with latents, theirs (they cannot be resized; a size asked for must fit them)."""
        family, config = self.family, self.config
        if latents is not None:
            sizes = [family.latents_size(latents)]
        else:
            sizes = [(config.height, config.width), image_size(image) if image is not None else (None, None)]
        height = _first(params.height, *(h for h, _ in sizes), family.default_size)
        width = _first(params.width, *(w for _, w in sizes), family.default_size)
        return height, width

    # ---- lifecycle ---------------------------------------------------------------------------------
    def execute_model(self, scheduler_output: DiffusionSchedulerOutput) -> list[DiffusionOutput]:
        """Free the requests that ended, set up the new ones, run one denoising step per group and decode
        the requests that finished; returns the outputs of the requests that finished or failed."""
        self._free(scheduler_output.finished_req_ids)
        failed = self.add_requests(scheduler_output.new_requests)
        finished, failed_in_step = self._execute(scheduler_output.groups)
        return (
            failed + failed_in_step + self._previews(scheduler_output.groups) + self._take_outputs(finished)
        )

    @torch.inference_mode()
    def add_requests(self, requests: list[DiffusionRequest]) -> list[DiffusionOutput]:
        """Set up denoising states; returns error outputs of requests that could not be set up."""
        guided = [r for r in requests if self.family.guidance_on(r.guidance_scale)]
        texts = {r.prompt for r in requests if r.prompt_embeds is None}
        texts |= {r.negative_prompt for r in guided if r.negative_prompt_embeds is None}
        conditioning = self._conditioning(sorted(texts))
        failed = []
        for r in requests:
            try:
                self.states[r.request_id] = self.family.prepare(r, *self._conditioning_of(r, conditioning))
            except Exception as exc:  # a bad init image must not stop the others
                failed.append(_error_output(r, exc))
        return failed

    def _conditioning_of(self, request: DiffusionRequest, conditioning: dict[str, Any]) -> tuple[Any, Any]:
        """(cond, uncond) of ``request``: tensors it brought, else its texts' encodings (uncond if guided)."""
        cond = request.prompt_embeds
        cond = conditioning[request.prompt] if cond is None else cond
        if not self.family.guidance_on(request.guidance_scale):
            return cond, None
        uncond = request.negative_prompt_embeds
        return cond, conditioning[request.negative_prompt] if uncond is None else uncond

    def _conditioning(self, texts: list[str]) -> dict[str, Any]:
        keys = {text: conditioning_key(self.family.encoder_id, text, None) for text in texts}
        found = {text: self.conditioning_cache.get(key) for text, key in keys.items()}
        missing = [text for text, value in found.items() if value is None]
        if missing:
            for text, value in zip(missing, self.family.encode(missing), strict=True):
                self.conditioning_cache.put(keys[text], value)
                found[text] = value
        return found

    @torch.inference_mode()
    def _execute(self, groups: list[list[str]]) -> tuple[list[str], list[DiffusionOutput]]:
        """One denoising step for each group; returns (finished ids, error outputs of failed requests)."""
        finished, failed = [], []
        for ids in groups:
            states = [self.states[i] for i in ids if i in self.states]  # not those whose set-up failed
            if not states:
                continue
            try:
                self._denoise_step(states)
            except Exception as exc:  # fail this group, keep serving the others
                failed += [_error_output(s.request, exc) for s in states]
                continue
            finished += [s.request.request_id for s in states if s.finished]
        return finished, failed

    def _denoise_step(self, states: list[DenoiseState]) -> None:
        if self.step_cache is not None:
            self.step_cache.bind([memory for _, _, memory in denoise_rows(states)])
        for state, output in zip(states, self.family.predict(states), strict=True):
            self.family.step(state, output)

    @torch.inference_mode()
    def _take_outputs(self, request_ids: list[str]) -> list[DiffusionOutput]:
        """Outputs of finished requests (one VAE pass per image shape); their states stay until freed."""
        states = [self.states[i] for i in request_ids]
        images: dict[str, Any] = {}
        to_decode = [s for s in states if s.request.output_type != "latent"]
        for shape in {tuple(s.latents.shape) for s in to_decode}:
            group = [s for s in to_decode if tuple(s.latents.shape) == shape]
            decoded = self.family.decode(torch.cat([s.latents for s in group]), output_type="pt")
            for i, s in enumerate(group):
                images[s.request.request_id] = self._postprocess(decoded[i : i + 1], s.request.output_type)
        return [self._output(s, images.get(s.request.request_id)) for s in states]

    @torch.inference_mode()
    def _previews(self, groups: list[list[str]]) -> list[DiffusionOutput]:
        """Previews of the requests that just reached one of their preview steps: the image decoded from
        their latents so far (one VAE pass per request)."""
        previews = []
        for state in (self.states[i] for ids in groups for i in ids if i in self.states):
            index = _preview_index(state)
            if index is not None and state.request.output_type != "latent":
                image = self.family.decode(state.latents, output_type="pt")
                preview = self._output(state, self._postprocess(image, state.request.output_type))
                preview.partial_image_index, preview.latents = index, None
                previews.append(preview)
        return previews

    def _postprocess(self, image: torch.Tensor, output_type: str) -> Any:
        processor = self.family.pipe.image_processor
        return processor.postprocess(image, output_type=output_type, do_denormalize=[False])

    def _output(self, state: DenoiseState, images: Any) -> DiffusionOutput:
        request = state.request
        want_latents = request.return_latents or request.output_type == "latent"
        now = time.monotonic()
        return DiffusionOutput(
            request_id=request.request_id,
            images=images,
            latents=state.latents.detach().cpu() if want_latents else None,
            seed=request.seed,
            num_steps=state.step_index,
            metrics={
                "queue": state.started - request.arrival_time,
                "total": now - request.arrival_time,
            },
        )

    def _free(self, request_ids: set[str]) -> None:
        """Release the states of requests that ended: the one place states are freed."""
        for request_id in request_ids:
            self.states.pop(request_id, None)

    def running_bytes(self) -> int:
        """Bytes held by the denoising states of the running batch."""
        return sum(s.nbytes() for s in self.states.values())


def _warm_up_batches(first: DenoiseState, others: list[DenoiseState], rows: int) -> list[list[DenoiseState]]:
    """``rows`` rows of ``first``, then, from 2 rows, ``first`` rows ending in each of ``others``."""
    return [[first] * rows] + [[first] * (rows - 1) + [other] for other in others if rows > 1]


def _preview_index(state: DenoiseState) -> int | None:
    """Which preview ``state`` owes now: previews k = 0..p-1 fall after step round((k + 1) * n / (p + 1))."""
    count, total = state.request.partial_images, len(state.timesteps)
    if not count or state.finished:
        return None
    steps = [round((k + 1) * total / (count + 1)) for k in range(count)]
    return steps.index(state.step_index) if state.step_index in steps else None


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _error_output(request: DiffusionRequest, exc: Exception) -> DiffusionOutput:
    error = f"{type(exc).__name__}: {exc}"
    return DiffusionOutput(request_id=request.request_id, seed=request.seed, error=error)
