"""Any diffusers pipeline as a DiT stage engine, run through its own ``__call__`` (the black-box path).

Requests whose call arguments match (size, steps, guidance, strength, output type) run in one call with
lists of prompts, negative prompts and per-request generators, so each image is the one the pipeline makes
for that request alone. Batching is per request, not per step: a request joins only when a call starts,
and an abort takes effect between calls.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections import deque
from typing import Any, NamedTuple

import torch

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import (
    DiffusionOutput,
    DiffusionRequest,
    DiffusionSamplingParams,
    parse_prompt,
)


class _CallKey(NamedTuple):
    """Call arguments requests must share to run in one call (None: the pipeline's default)."""

    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    strength: float | None
    output_type: str
    has_image: bool


def _call_key(request: DiffusionRequest) -> _CallKey:
    return _CallKey(
        request.height, request.width, request.num_inference_steps, request.guidance_scale,
        request.strength, request.output_type, request.image is not None,
    )  # fmt: skip


class DiffusersPipelineExecutor:
    """Same interface as ``DiffusionEngine``: ``add_request``, ``abort_request``, ``step``."""

    def __init__(self, model_path: str, config: DiTConfig) -> None:
        from diffusers import DiffusionPipeline

        self.config = config
        self.pipe = DiffusionPipeline.from_pretrained(model_path, dtype=config.torch_dtype())
        self.pipe.to(config.torch_device())
        self.pipe.set_progress_bar_config(disable=True)
        if config.attention_backend == "xformers":
            self.pipe.enable_xformers_memory_efficient_attention()
        self._image_pipe = None
        self.waiting: deque[DiffusionRequest] = deque()
        self._aborted: list[DiffusionOutput] = []

    def add_request(
        self, request_id: str, prompt: Any, params: DiffusionSamplingParams | None = None
    ) -> None:
        """Validate against the pipeline's call signature and queue."""
        params, parsed = params or DiffusionSamplingParams(), parse_prompt(prompt)
        if params.sampler is not None:
            raise ValueError(
                "sampler: the diffusers executor runs the folder's own scheduler; leave it unset"
            )
        if params.return_latents:
            raise ValueError("return_latents is not available with use_diffusers; use output_type='latent'")
        if parsed["image"] is None and params.strength is not None:
            raise ValueError("strength is for image-to-image: pass the init image as prompt['image']")
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise ValueError("the waiting queue is full (DiTConfig.max_waiting_requests); retry later")
        if parsed["image"] is not None:
            self._pipeline_for(image=True)
        config = self.config
        self.waiting.append(
            DiffusionRequest(
                request_id=request_id,
                prompt=parsed["prompt"],
                negative_prompt=parsed["negative_prompt"],
                image=parsed["image"],
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
        batch = [r for r in self.waiting if _call_key(r) == key][: self.config.max_batch_size]
        self.waiting = deque(r for r in self.waiting if r not in batch)
        try:
            outputs += self._call(batch)
        except Exception as exc:  # the pipeline rejected the arguments: fail this call only
            error = f"{type(exc).__name__}: {exc}"
            outputs += [DiffusionOutput(request_id=r.request_id, seed=r.seed, error=error) for r in batch]
        return outputs

    @torch.inference_mode()
    def _call(self, batch: list[DiffusionRequest]) -> list[DiffusionOutput]:
        first = batch[0]
        pipe = self._pipeline_for(image=first.image is not None)
        kwargs = {k: v for k, v in _call_key(first)._asdict().items() if v is not None and k != "has_image"}
        kwargs["prompt"] = [r.prompt for r in batch]
        if any(r.negative_prompt for r in batch):
            kwargs["negative_prompt"] = [r.negative_prompt or "" for r in batch]
        if first.image is not None:
            kwargs["image"] = [r.image for r in batch]
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

    def _pipeline_for(self, image: bool) -> Any:
        if not image or "image" in inspect.signature(self.pipe.__call__).parameters:
            return self.pipe
        if self._image_pipe is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._image_pipe = AutoPipelineForImage2Image.from_pipe(self.pipe)
            except ValueError as exc:
                raise ValueError(f"image: {type(self.pipe).__name__} has no image-to-image pipeline") from exc
            self._image_pipe.set_progress_bar_config(disable=True)
        return self._image_pipe

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self._aborted)

    def memory_stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": len(self.waiting), "states": 0, "running_bytes": 0, "cache_bytes": 0}
