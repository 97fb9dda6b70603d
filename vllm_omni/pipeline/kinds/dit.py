"""The ``dit`` stage kind: a diffusion engine (step-level native engine or the diffusers executor)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.diffusion.limits import DiTLimits
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.pipeline.kinds.base import StageEngine, StageEvent, StageKind
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import StageRequest
from vllm_omni.pipeline.stage_metrics import StageMetrics


class DiTStageKind(StageKind):
    """Text, prompt embeddings, an init image or latents in; images and/or latents out."""

    name = "dit"
    output_modalities = ("image", "latent")
    input_modalities = ("text", "image", "latent", "hidden_states")

    def check_config(self, config: OmniStageConfig) -> None:
        if config.engine_args:
            where = f"stage {config.stage_id}"
            raise ValueError(f"{where}: engine_args are for engine_type 'ar'; a 'dit' stage takes dit_config")
        if isinstance(config.dit_config, dict):
            config.dit_config = DiTConfig.from_dict(config.dit_config)
        config.dit_config = config.dit_config or DiTConfig()
        super().check_config(config)

    def make_params(self, config: OmniStageConfig, entry: Any) -> DiffusionSamplingParams:
        """The entry's params; a stage with ``latent`` in ``output_modalities`` returns its latents (only
        them, undecoded, unless ``image`` is there too)."""
        if entry is None:
            params = DiffusionSamplingParams()
        elif isinstance(entry, dict):
            params = DiffusionSamplingParams.from_dict(entry)
        elif isinstance(entry, DiffusionSamplingParams):
            params = entry
        else:
            where, got = f"stage {config.stage_id} (dit)", type(entry).__name__
            raise ValueError(f"{where} takes DiffusionSamplingParams or a dict, got {got}")
        if "latent" not in config.output_modalities:
            return params
        if "image" in config.output_modalities:
            return dataclasses.replace(params, return_latents=True)
        return dataclasses.replace(params, output_type="latent")

    def check_params(self, limits: DiTLimits, params: DiffusionSamplingParams) -> None:
        limits.check_params(params)

    def queue_bound(self, limits: DiTLimits) -> int:
        return limits.max_num_requests

    def make_engine(self, config: OmniStageConfig) -> DiTStageEngine:
        return DiTStageEngine(config)

    def merge_output(self, result: OmniRequestOutput, output: Any) -> None:
        result.images, result.latents = output.images, output.latents

    def summarize(self, output: Any) -> dict[str, Any]:
        return {"seed": output.seed, "num_steps": output.num_steps, "seconds": output.metrics}


class DiTStageEngine(StageEngine):
    """A diffusion engine, stepped in the stage's process."""

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

        self.engine = create_diffusion_engine(config.model_path, config.dit_config)

    def add_one(self, request: StageRequest) -> None:
        self.engine.add_request(request.request_id, request.prompt, request.params)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort_request(request_ids)

    def step(self) -> list[StageEvent]:
        return [
            StageEvent(o.request_id, o, o.partial_image_index is None, o.error) for o in self.engine.step()
        ]

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stats(self) -> dict[str, int | str]:
        """The engine's memory stats and which executor runs (``native`` or ``diffusers``)."""
        return {"executor": self.engine.executor, **self.engine.memory_stats()}

    def metrics(self) -> StageMetrics:
        """The batch, the queue and the conditioning cache's counters (the native engine's)."""
        stats, cache = self.engine.memory_stats(), self.engine.conditioning_cache_stats()
        return StageMetrics(
            num_running=stats.get("running", 0),  # the diffusers executor runs nothing between steps
            num_waiting=stats["waiting"],
            conditioning_cache_queries=None if cache is None else cache.hits + cache.misses,
            conditioning_cache_hits=None if cache is None else cache.hits,
        )

    def limits(self) -> DiTLimits:
        return self.engine.limits


DIT_STAGE = DiTStageKind()
