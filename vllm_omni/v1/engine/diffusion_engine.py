"""The DiT stage's engine loop: scheduler + runner (native) or the diffusers pipeline (black box)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.cache_manager import DiTCacheStats
from vllm_omni.diffusion.memory import DiTMemoryEstimate
from vllm_omni.diffusion.models import select_executor
from vllm_omni.diffusion.request import DiffusionOutput, DiffusionRequest, DiffusionSamplingParams
from vllm_omni.logger import init_logger
from vllm_omni.transformers_utils.model_resolution import diffusers_folder, pipeline_class_name
from vllm_omni.v1.core.sched.diffusion_scheduler import OmniDiffusionScheduler
from vllm_omni.v1.executor.diffusers_executor import DiffusersPipelineExecutor
from vllm_omni.v1.worker.diffusion_model_runner import OmniDiffusionModelRunner

logger = init_logger(__name__)


class DiffusionEngine:
    """Serves diffusion requests with step-level batching.

    ``add_request`` validates at once (ValueError naming the field) and never disturbs running requests;
    each ``step`` runs one denoising step of the running batch and returns the requests that ended
    (finished, failed or aborted are all reported once). The scheduler owns the requests' lifecycle; the
    runner frees a request's state when a scheduler output lists it as ended.
    """

    executor = "native"
    """Which ``DiTConfig.executor`` this engine is."""

    def __init__(self, model_path: str, config: DiTConfig | None = None) -> None:
        self.config = config or DiTConfig()
        self.runner = OmniDiffusionModelRunner(model_path, self.config)
        self.runner.warm_up()
        self.limits = self.runner.limits
        """What this stage accepts (``DiTLimits``: picklable, checkable without the model)."""
        self.scheduler = OmniDiffusionScheduler(
            self.limits, self.config.memory_budget, self._request_bytes(model_path)
        )
        self._aborted: list[DiffusionOutput] = []

    def _request_bytes(self, model_path: str) -> Callable[[DiffusionRequest], int] | None:
        """A request's working-memory estimate, for ``DiTConfig.memory_budget`` (None without a budget)."""
        if self.config.memory_budget is None:
            return None
        folder = diffusers_folder(model_path, self.config.revision)
        estimate = DiTMemoryEstimate.from_folder(folder, self.config)
        guidance_on = self.runner.family.guidance_on
        return lambda r: estimate.request_bytes(r.height, r.width, guidance_on(r.guidance_scale))

    def add_request(
        self, request_id: str, prompt: Any, params: DiffusionSamplingParams | None = None
    ) -> None:
        """Validate and queue a request; ``prompt``: a string or a dict (``prompt`` or ``prompt_embeds``,
        ``negative_prompt`` or ``negative_prompt_embeds``, ``image``; see ``parse_prompt``)."""
        request = self.runner.make_request(request_id, prompt, params or DiffusionSamplingParams())
        self.scheduler.add_request(request)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop these requests at once: the runner frees their latents now (a scheduler output that only
        frees), and the next ``step`` reports each with error ``"aborted"``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in self.scheduler.finish_requests(ids):
            self._aborted.append(DiffusionOutput(request_id=request_id, error="aborted"))
        self.runner.execute_model(self.scheduler.schedule_frees())

    def step(self) -> list[DiffusionOutput]:
        """One denoising step of every running request; returns the requests that ended and the previews
        (``partial_image_index``) of those that reached a preview step."""
        outputs = self.runner.execute_model(self.scheduler.schedule())
        self.scheduler.finish_requests([o.request_id for o in outputs if o.partial_image_index is None])
        outputs, self._aborted = self._aborted + outputs, []
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests to run, outputs to report, or states to free (the next ``step`` frees them)."""
        return self.scheduler.has_requests() or bool(self._aborted)

    def memory_stats(self) -> dict[str, int]:
        """Requests and bytes held: running/waiting counts, denoising states and their bytes, the bytes the
        waiting requests hold (tensors, init images), conditioning-cache bytes."""
        running, waiting = self.scheduler.num_requests()
        return {
            "running": running,
            "waiting": waiting,
            "states": len(self.runner.states),
            "running_bytes": self.runner.running_bytes(),
            "waiting_bytes": sum(request.nbytes() for request in self.scheduler.waiting),
            "cache_bytes": self.runner.conditioning_cache.stats.bytes,
        }

    def conditioning_cache_stats(self) -> DiTCacheStats:
        """The conditioning cache's counters (hits, misses, evictions) and occupancy."""
        return self.runner.conditioning_cache.stats


def create_diffusion_engine(model_path: str, config: DiTConfig | None = None):
    """The engine ``config.executor`` picks for ``model_path`` (a diffusers folder or hub repo id at
    ``config.revision``): the native step-level engine or the diffusers pipeline as a black box. Logs which
    one runs; its ``executor`` attribute says it too."""
    config = config or DiTConfig()
    folder = diffusers_folder(model_path, config.revision)
    class_name = pipeline_class_name(folder)
    executor = select_executor(class_name, config)
    logger.info("DiT stage %s: %s runs on the %s executor (DiTConfig.executor=%r)",
                model_path, class_name, executor, config.executor)  # fmt: skip
    engine_class = DiffusionEngine if executor == "native" else DiffusersPipelineExecutor
    return engine_class(str(folder), config)
