"""Any diffusers pipeline as a DiT stage engine, run through its own ``__call__`` (the black-box path).

Requests whose call arguments match (size, steps, guidance, strength, output type) run in one call with
lists of prompts, negative prompts and per-request generators, so each image is the one the pipeline makes
for that request alone. Init images go to the family's image-to-image pipeline, init images with a mask to
its inpainting pipeline (``AutoPipelineForImage2Image`` / ``AutoPipelineForInpainting.from_pipe``).
Batching is per request, not per step: a request joins only when a call starts, and an abort takes effect
between calls. Conditioning given as tensors (``prompt_embeds``) is checked by the pipeline's native family
and passed as the pipeline's own ``prompt_embeds`` arguments.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections import deque
from typing import Any, NamedTuple

import torch

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.images import check_mask
from vllm_omni.diffusion.limits import DiTLimits
from vllm_omni.diffusion.memory import DiTMemoryEstimate, check_fits
from vllm_omni.diffusion.models import FAMILIES, DiTFamily
from vllm_omni.diffusion.prompt_embeds import EMBEDS_KEYS, SIDES
from vllm_omni.diffusion.request import (
    DiffusionOutput,
    DiffusionRequest,
    DiffusionSamplingParams,
    parse_prompt,
)
from vllm_omni.transformers_utils.model_resolution import diffusers_folder

_TASKS = {"image": ("AutoPipelineForImage2Image", "image-to-image"),
          "mask_image": ("AutoPipelineForInpainting", "inpainting")}  # fmt: skip
"""A request's extra argument -> the diffusers auto pipeline that adds it to ``pipe``'s family, the task."""


class _CallKey(NamedTuple):
    """Call arguments requests must share to run in one call (None: the pipeline's default)."""

    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    strength: float | None
    output_type: str
    has_image: bool
    has_mask: bool
    has_embeds: bool


def _call_key(request: DiffusionRequest) -> _CallKey:
    return _CallKey(
        request.height, request.width, request.num_inference_steps, request.guidance_scale,
        request.strength, request.output_type, request.image is not None, request.mask_image is not None,
        request.prompt_embeds is not None,
    )  # fmt: skip


class DiffusersPipelineExecutor:
    """Same interface as ``DiffusionEngine``: ``add_request``, ``abort_request``, ``step``, ``limits``,
    ``memory_stats``, ``conditioning_cache_stats``."""

    executor = "diffusers"
    """Which ``DiTConfig.executor`` this engine is."""

    def __init__(self, model_path: str, config: DiTConfig) -> None:
        """``model_path``: a diffusers folder or hub repo id (at ``config.revision``)."""
        from diffusers import DiffusionPipeline

        self.config = config
        folder = diffusers_folder(model_path, config.revision)
        self.pipe = DiffusionPipeline.from_pretrained(folder, dtype=config.torch_dtype())
        self.pipe.to(config.torch_device())
        self.pipe.set_progress_bar_config(disable=True)
        if config.attention_backend == "xformers":
            self.pipe.enable_xformers_memory_efficient_attention()
        self._task_pipes: dict[str, Any] = {}
        """The image-to-image and inpainting pipelines, made from ``pipe`` when first needed, by the
        argument they add (``image``, ``mask_image``)."""
        self.family = _native_family(self.pipe, config)
        """The pipeline's native family (checks and shapes prompt embeddings), None for other pipelines."""
        self.limits = _limits(self.pipe, self.family, config, self._inpaints())
        """What this stage accepts (``DiTLimits``: picklable, checkable without the model)."""
        self.memory = None
        """The model's memory estimate, with ``DiTConfig.memory_budget`` (None without a budget)."""
        if config.memory_budget is not None:
            self.memory = DiTMemoryEstimate.from_folder(folder, config)
        self.waiting: deque[DiffusionRequest] = deque()
        self._aborted: list[DiffusionOutput] = []

    def add_request(
        self, request_id: str, prompt: Any, params: DiffusionSamplingParams | None = None
    ) -> None:
        """Validate (``limits``, then the pipeline's call signature) and queue."""
        params, parsed = params or DiffusionSamplingParams(), parse_prompt(prompt)
        image, mask = parsed["image"], parsed["mask_image"]
        has_latents = parsed["latents"] is not None
        self.limits.check_request(
            params, image is not None, has_mask=mask is not None, has_latents=has_latents
        )
        self.limits.check_room(len(self.waiting))
        if mask is not None:
            check_mask(mask, image)
        if image is not None:
            self._pipeline_for(image=True, mask=mask is not None)
        cond, uncond = self._given_conditioning(parsed)
        config = self.config
        if self.memory is not None:
            height, width = params.height or config.height, params.width or config.width
            check_fits(self.memory.request_bytes(height, width), config.memory_budget, height, width)
        self.waiting.append(
            DiffusionRequest(
                request_id=request_id,
                prompt=parsed["prompt"],
                negative_prompt=parsed["negative_prompt"],
                image=image,
                mask_image=mask,
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                height=params.height or config.height,
                width=params.width or config.width,
                num_inference_steps=params.num_inference_steps or config.num_inference_steps,
                guidance_scale=config.guidance_scale
                if params.guidance_scale is None
                else params.guidance_scale,
                seed=params.seed if params.seed is not None else secrets.randbits(63),
                strength=params.strength,
                sampler="",
                output_type=params.output_type,
                return_latents=False,
            )
        )

    def _given_conditioning(self, parsed: dict[str, Any]) -> tuple[Any, Any]:
        given = [key for key in EMBEDS_KEYS if parsed.get(key) is not None]
        if not given:
            return None, None
        name = type(self.pipe).__name__
        if self.family is None:
            raise ValueError(
                f"{given[0]}: the diffusers executor takes tensors only for the pipelines of the native "
                f"families ({sorted(FAMILIES)}), whose shapes are known; {name} is not one"
            )
        pipe = self._pipeline_for(image=parsed["image"] is not None, mask=parsed["mask_image"] is not None)
        accepted = inspect.signature(pipe.__call__).parameters
        for key in (side + key for side in SIDES for key in self.family.embeds_keys):
            if key not in accepted:
                raise ValueError(f"{given[0]}: {type(pipe).__name__}.__call__ takes no {key} to pass it to")
        return self.family.given_conditioning(parsed)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        aborted = [r.request_id for r in self.waiting if r.request_id in ids]
        self._aborted += [DiffusionOutput(request_id=request_id, error="aborted") for request_id in aborted]
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def step(self) -> list[DiffusionOutput]:
        """One pipeline call for the oldest request and the waiting requests that share its arguments."""
        outputs, self._aborted = self._aborted, []
        if not self.waiting:
            return outputs
        key = _call_key(self.waiting[0])
        batch = [r for r in self.waiting if _call_key(r) == key][: self._max_batch_size(key)]
        self.waiting = deque(r for r in self.waiting if r not in batch)
        try:
            outputs += self._call(batch)
        except Exception as exc:  # the pipeline rejected the arguments: fail this call only
            error = f"{type(exc).__name__}: {exc}"
            outputs += [DiffusionOutput(request_id=r.request_id, seed=r.seed, error=error) for r in batch]
        return outputs

    def _max_batch_size(self, key: _CallKey) -> int:
        """``max_batch_size``, or fewer: as many calls of ``key``'s size as fit the memory budget."""
        if self.memory is None:
            return self.config.max_batch_size
        needed = self.memory.request_bytes(key.height, key.width)  # guided: the pipeline's choice, unknown
        return max(1, min(self.config.max_batch_size, self.config.memory_budget // needed))

    @torch.inference_mode()
    def _call(self, batch: list[DiffusionRequest]) -> list[DiffusionOutput]:
        first = batch[0]
        pipe = self._pipeline_for(image=first.image is not None, mask=first.mask_image is not None)
        kwargs = {k: v for k, v in _call_key(first)._asdict().items() if v is not None and k[:4] != "has_"}
        if first.prompt_embeds is not None:
            kwargs |= self._embeds_arguments(batch, first.guidance_scale)
        else:
            kwargs["prompt"] = [r.prompt for r in batch]
            if any(r.negative_prompt for r in batch):
                kwargs["negative_prompt"] = [r.negative_prompt or "" for r in batch]
        if first.image is not None:
            kwargs["image"] = [r.image for r in batch]
        if first.mask_image is not None:
            kwargs["mask_image"] = [r.mask_image for r in batch]
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        images = pipe(**kwargs).images
        now = time.monotonic()
        return [
            DiffusionOutput(
                request_id=r.request_id,
                images=None if first.output_type == "latent" else images[i : i + 1],
                latents=images[i : i + 1].cpu() if first.output_type == "latent" else None,
                seed=r.seed,
                num_steps=r.num_inference_steps or 0,
                metrics={"total": now - r.arrival_time},
            )
            for i, r in enumerate(batch)
        ]

    def _embeds_arguments(self, batch: list[DiffusionRequest], guidance_scale: float | None) -> dict:
        """The pipeline's ``prompt_embeds`` arguments of ``batch``; when guidance is on, the negatives too
        (negative texts encoded by the stage's encoder, as the native engine does: ZImagePipeline refuses
        ``prompt_embeds`` without ``negative_prompt_embeds``)."""
        family = self.family
        kwargs = self._as_arguments([r.prompt_embeds for r in batch], "")
        if family.guidance_on(family.default_guidance if guidance_scale is None else guidance_scale):
            texts = [r.negative_prompt or "" for r in batch if r.negative_prompt_embeds is None]
            encoded = iter(family.encode(texts) if texts else [])
            unconds = [r.negative_prompt_embeds for r in batch]
            kwargs |= self._as_arguments([next(encoded) if u is None else u for u in unconds], "negative_")
        return kwargs

    def _as_arguments(self, conditionings: list[Any], side: str) -> dict[str, Any]:
        columns = zip(*(self.family.embeds_of(c) for c in conditionings), strict=True)
        return {
            side + key: list(column) if self.family.embeds_as_list else torch.stack(column)
            for key, column in zip(self.family.embeds_keys, columns, strict=True)
        }

    def _pipeline_for(self, image: bool, mask: bool = False) -> Any:
        """The pipeline a request runs on: ``pipe`` when its ``__call__`` takes the request's init image (and
        mask), else the family's image-to-image (inpainting) pipeline; ``ValueError`` when it has none."""
        argument = "mask_image" if mask else "image" if image else None
        if argument is None or argument in inspect.signature(self.pipe.__call__).parameters:
            return self.pipe
        if argument not in self._task_pipes:
            self._task_pipes[argument] = self._from_pipe(argument)
        return self._task_pipes[argument]

    def _from_pipe(self, argument: str) -> Any:
        import diffusers

        auto, task = _TASKS[argument]
        try:
            pipe = getattr(diffusers, auto).from_pipe(self.pipe)
        except ValueError as exc:
            raise ValueError(f"{argument}: {type(self.pipe).__name__} has no {task} pipeline") from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _inpaints(self) -> bool:
        """Whether masks are served: ``pipe`` inpaints, or its family has an inpainting pipeline."""
        try:
            self._pipeline_for(image=True, mask=True)
        except ValueError:
            return False
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests to run or outputs to report."""
        return bool(self.waiting or self._aborted)

    def memory_stats(self) -> dict[str, int]:
        """What the executor holds between pipeline calls: the waiting requests and the bytes of their data
        (tensors, init images). No request runs between calls and there is no state or cache to report."""
        return {"waiting": len(self.waiting), "waiting_bytes": sum(r.nbytes() for r in self.waiting)}

    def conditioning_cache_stats(self) -> None:
        """None: the pipeline encodes every call's prompts itself; there is no conditioning cache."""
        return None


def _limits(pipe: Any, family: DiTFamily | None, config: DiTConfig, inpainting: bool) -> DiTLimits:
    """A native family's pipeline refuses sizes that are not multiples of the family's factor (its
    ``check_inputs``); other pipelines differ (many resize instead), so their own checks apply, per call."""
    if family is None:
        return DiTLimits.from_config(config, type(pipe).__name__, 1, samplers=(), step_level=False,
                                     inpainting=inpainting)  # fmt: skip
    return DiTLimits.from_config(config, family.name, family.size_factor, samplers=(), step_level=False,
                                 model_max_size=family.max_size, inpainting=inpainting)  # fmt: skip


def _native_family(pipe: Any, config: DiTConfig) -> DiTFamily | None:
    for family in FAMILIES.values():
        if type(pipe).__name__ in family.pipeline_classes:
            return family(pipe, config.torch_device(), config.torch_dtype())
    return None
