"""Stage engines: the engine of one stage behind one small interface, stepped by its stage process.

``add`` queues a batch of requests (all or none: a bad one raises and the others are aborted), ``step``
runs one engine step and returns ``(request_id, output, finished)`` for every request with news (the
stage process drops news of requests it no longer serves, e.g. aborted ones), ``abort`` drops requests
at once, ``stats`` reports what the engine holds. ``stage_params`` turns a user's
per-request entry into the stage's parameter object; the manager calls it before anything is sent.
"""

from __future__ import annotations

from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams

StageEvent = tuple[str, Any, bool]
"""(request id, the engine's output for it, whether the request is done in this stage)."""


def stage_params(config: OmniStageConfig, entry: Any) -> Any:
    """The stage's params object for ``entry``: ``None``, a dict of its fields, or the object itself."""
    return _ar_params(config, entry) if config.engine_type == "ar" else _dit_params(config, entry)


def _ar_params(config: OmniStageConfig, entry: Any) -> Any:
    from vllm import SamplingParams

    where = f"stage {config.stage_id} (ar)"
    if entry is None:
        params = SamplingParams()
    elif isinstance(entry, dict):
        try:
            params = SamplingParams(**entry)
        except TypeError as error:
            raise ValueError(f"{where}: bad SamplingParams field: {error}") from None
    elif isinstance(entry, SamplingParams):
        params = entry.clone()
    else:
        raise ValueError(f"{where} takes SamplingParams or a dict, got {type(entry).__name__}")
    if "hidden_states" in config.output_modalities:
        params.extra_args = {**(params.extra_args or {}), "prompt_hidden_states": True}
    return params


def _dit_params(config: OmniStageConfig, entry: Any) -> DiffusionSamplingParams:
    if entry is None:
        return DiffusionSamplingParams()
    if isinstance(entry, dict):
        return DiffusionSamplingParams.from_dict(entry)
    if isinstance(entry, DiffusionSamplingParams):
        return entry
    raise ValueError(
        f"stage {config.stage_id} (dit) takes DiffusionSamplingParams or a dict, got {type(entry).__name__}"
    )


class StageEngine:
    """What both engine kinds share: all-or-none adds, aborts, the unfinished check."""

    engine: Any

    def add(self, requests: list[tuple[str, Any, Any]]) -> None:
        """Queue ``(request_id, prompt, params)`` requests; one that fails raises, the others are aborted."""
        added = []
        try:
            for request_id, prompt, params in requests:
                self._add_one(request_id, prompt, params)
                added.append(request_id)
        except Exception:
            self.abort(added)
            raise

    def _add_one(self, request_id: str, prompt: Any, params: Any) -> None:
        raise NotImplementedError

    def abort(self, request_ids: list[str]) -> None:
        """Drop these requests now, freeing what the engine holds for them."""
        if request_ids:
            self.engine.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()


class ARStageEngine(StageEngine):
    """A ``vllm.LLM`` (its EngineCore in its own process), fed request by request.

    Prompts are rendered the way ``LLM.generate`` renders them; requests keep their own ``output_kind``
    (CUMULATIVE streams tokens) and the pipeline's request ids.
    """

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm import LLM

        engine_args = dict(config.engine_args)
        if "hidden_states" in config.output_modalities:
            engine_args.setdefault("return_prompt_hidden_states", True)
        self.llm = LLM(model=config.model_path, **engine_args)
        self.engine = self.llm.llm_engine

    def _add_one(self, request_id: str, prompt: Any, params: Any) -> None:
        (engine_input,) = self.llm._preprocess_cmpl([prompt])
        self.engine.add_request(request_id, engine_input, params)

    def step(self) -> list[StageEvent]:
        return [(out.request_id, out, out.finished) for out in self.engine.step()]

    def stats(self) -> dict[str, int]:
        return {"unfinished": self.engine.get_num_unfinished_requests()}

    def close(self) -> None:
        self.engine.engine_core.shutdown()


class DiTStageEngine(StageEngine):
    """A diffusion engine (native step-level engine or the diffusers executor), stepped in this process."""

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

        self.engine = create_diffusion_engine(config.model_path, config.dit_config)

    def _add_one(self, request_id: str, prompt: Any, params: Any) -> None:
        self.engine.add_request(request_id, prompt, params)

    def step(self) -> list[StageEvent]:
        return [(out.request_id, out, True) for out in self.engine.step()]

    def stats(self) -> dict[str, int]:
        return self.engine.memory_stats()

    def close(self) -> None:
        """Nothing to stop: the engine lives in this process."""


def make_stage_engine(config: OmniStageConfig) -> ARStageEngine | DiTStageEngine:
    """The engine of ``config``'s kind (built in the stage's own process)."""
    return ARStageEngine(config) if config.engine_type == "ar" else DiTStageEngine(config)
