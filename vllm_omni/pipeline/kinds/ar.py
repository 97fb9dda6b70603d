"""The ``ar`` stage kind: an autoregressive vLLM engine (``vllm.LLM``, its EngineCore in its own process)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.kinds.base import StageEngine, StageEvent, StageKind, StageRoute
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import StageRequest
from vllm_omni.pipeline.stage_metrics import StageMetrics, collect_vllm_metrics
from vllm_omni.transformers_utils.model_resolution import ensure_available


@dataclass(frozen=True)
class ARLimits:
    """The model settings ``SamplingParams.verify`` reads (vLLM's own up-front checks: logprobs, token ids
    in logit_bias / allowed_token_ids / stop_token_ids, ...), published by an ``ar`` stage so that the
    manager runs those checks before any stage computes. Structured outputs and speculative decoding are
    checked by the stage itself."""

    max_model_len: int
    max_logprobs: int
    vocab_size: int
    is_diffusion: bool
    enable_trace_replay: bool

    @classmethod
    def from_model_config(cls, model_config: Any) -> ARLimits:
        return cls(
            max_model_len=model_config.max_model_len,
            max_logprobs=model_config.max_logprobs,
            vocab_size=model_config.get_vocab_size(),
            is_diffusion=model_config.is_diffusion,
            enable_trace_replay=model_config.enable_trace_replay,
        )

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def check_params(self, params: Any) -> None:
        """vLLM's checks of ``params`` against these settings (ValueError with vLLM's message)."""
        from vllm.exceptions import VLLMValidationError

        try:
            params.verify(self, None, None, None)
        except VLLMValidationError as error:
            raise ValueError(str(error)) from None


class ARStageKind(StageKind):
    """Text in, text and/or prompt hidden states out, or codec tokens (``audio_codes``: a talker's)."""

    name = "ar"
    output_modalities = ("text", "hidden_states", "audio_codes")
    input_modalities = ("text", "image", "hidden_states")  # hidden states: a talker's (its own hand-off)

    def check_config(self, config: OmniStageConfig) -> None:
        super().check_config(config)
        where = f"stage {config.stage_id}"
        if config.dit_config is not None:
            raise ValueError(f"{where}: dit_config is only for engine_type 'dit'")
        from vllm.engine.arg_utils import EngineArgs

        unknown = sorted(set(config.engine_args) - {f.name for f in fields(EngineArgs)})
        if unknown:
            raise ValueError(
                f"{where}: engine_args has unknown key(s) {unknown}; any vllm EngineArgs field is allowed"
            )
        if "model" in config.engine_args:
            raise ValueError(f"{where}: engine_args must not set 'model'; use model_path")

    def make_params(self, config: OmniStageConfig, entry: Any) -> Any:
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
        return params

    def prepare_params(self, config: OmniStageConfig, params: Any, route: StageRoute) -> Any:
        """Stream tokens (each a snapshot) only where someone sees them: when streaming, on a final stage
        or one whose reader takes its output while it is made (``streamed_on``), without prompt hidden
        states (not the tensor with every token; every position's come once, with the final output, and
        do not stop streaming). DELTA (each snapshot holds the new tokens only, as vLLM's server streams)
        only where no later stage needs the whole output. Hidden states: none for a request ``cut_short``
        here (they are for the stages it skips), every position's when the reading stage wants them
        (``all_positions``)."""
        from vllm.sampling_params import RequestOutputKind

        hidden_states = "hidden_states" in config.output_modalities and not route.cut_short
        if "hidden_states" in config.output_modalities:  # a request's own choice stands, unless cut short
            extra_args = dict(params.extra_args or {})
            if hidden_states:
                extra_args.setdefault("prompt_hidden_states", "all" if route.all_positions else True)
            else:
                extra_args.pop("prompt_hidden_states", None)
            params.extra_args = extra_args
        reports_steps = route.streaming and (config.final_output or route.streamed_on)
        if not reports_steps or (hidden_states and not route.all_positions):
            params.output_kind = RequestOutputKind.FINAL_ONLY
        elif params.output_kind == RequestOutputKind.DELTA and route.handed_on:
            raise ValueError(
                f"stage {config.stage_id}: output_kind DELTA is not supported on a stage that feeds a "
                "later one; use CUMULATIVE (the default) or FINAL_ONLY"
            )
        return params

    def check_params(self, limits: ARLimits, params: Any) -> None:
        limits.check_params(params)

    def make_engine(self, config: OmniStageConfig) -> ARStageEngine:
        return ARStageEngine(config)

    def merge_output(self, result: OmniRequestOutput, output: Any) -> None:
        result.text = output.outputs[0].text

    def summarize(self, output: Any) -> dict[str, Any]:
        completion = output.outputs[0]
        return {
            "text": completion.text,
            "num_prompt_tokens": len(output.prompt_token_ids or ()),
            "num_generated_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
        }


class ARStageEngine(StageEngine):
    """A ``vllm.LLM`` fed request by request: prompts rendered the way ``LLM.generate`` renders them (or
    already rendered: an ``EngineInput``), each request keeps its own ``output_kind`` (CUMULATIVE streams
    tokens) and the pipeline's request id."""

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm import LLM

        engine_args = dict(config.engine_args)
        if "hidden_states" in config.output_modalities:
            engine_args.setdefault("return_prompt_hidden_states", True)
        _run_engine_in_process(engine_args)
        ensure_available(config.model_path, engine_args.get("revision"))  # offline: an error naming the id
        self.llm = LLM(model=config.model_path, **engine_args)
        self.engine = self.llm.llm_engine

    def add_one(self, request: StageRequest) -> None:
        from vllm.exceptions import VLLMValidationError

        from vllm_omni.model_executor.models.input_extras import move_prompt_extras

        try:
            prompt, params = move_prompt_extras(request.prompt, request.params)
            if not _is_rendered(prompt):
                (prompt,) = self.llm._preprocess_cmpl([prompt])
            self.engine.add_request(request.request_id, prompt, params)
        except VLLMValidationError as error:  # a bad request (e.g. a prompt longer than max_model_len)
            raise ValueError(str(error)) from None

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort_request(request_ids)

    def step(self) -> list[StageEvent]:
        return [StageEvent(out.request_id, out, out.finished) for out in self.engine.step()]

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stats(self) -> dict[str, int]:
        return {"unfinished": self.engine.get_num_unfinished_requests()}

    def metrics(self) -> StageMetrics:
        """vLLM's own metrics and its running/waiting counts, recorded by the engine when it logs stats
        (``disable_log_stats=False``; ``vllm serve --omni`` sets it as ``vllm serve`` does); else none."""
        if not self.engine.log_stats:
            return StageMetrics()
        text, totals = collect_vllm_metrics()
        return StageMetrics(
            num_running=int(totals.get("vllm:num_requests_running", 0)),
            num_waiting=int(totals.get("vllm:num_requests_waiting", 0)),
            vllm_metrics=text,
        )

    def limits(self) -> ARLimits:
        return ARLimits.from_model_config(self.engine.model_config)

    def close(self) -> None:
        self.engine.engine_core.shutdown()


def _run_engine_in_process(engine_args: dict[str, Any]) -> None:
    """On CPU, with one worker, the stage's own process runs vLLM's engine core and worker (in-process
    engine core, ``uni`` executor), unless ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set (then vLLM's choice) or
    ``engine_args`` name another executor.

    vLLM's engine-core and worker processes busy-poll each other while requests run; on a CPU machine they
    take the cores the stage's own process and the server need, and tokens leave the stage in bursts. The
    tiny Qwen3 through ``AsyncOmniLLM``, 16 requests of 32 tokens in flight on 2 cores: 8700 instead of
    1600-2400 tokens/s, time to first token 7 instead of 110-280 ms. On a GPU the engine core keeps its
    own process (it overlaps output processing with the GPU's work).
    """
    import os

    from vllm.platforms import current_platform

    parallel = engine_args.get("tensor_parallel_size", 1) * engine_args.get("pipeline_parallel_size", 1)
    if not current_platform.is_cpu() or parallel != 1 or "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ:
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # this process is the stage's alone
    engine_args.setdefault("distributed_executor_backend", "uni")
    _take_the_threads_of_vllm_worker()


def _take_the_threads_of_vllm_worker() -> None:
    """The in-process worker computes on as many threads as vLLM's own CPU worker process would: the
    process's cores but one, unless ``OMP_NUM_THREADS`` is set (a stage's ``cpus`` set it).

    vLLM starts its CPU worker process with the cores of its NUMA node minus one per worker, reserved for
    the engine core and the frontend (``vllm.utils.ompmultiprocessing``: on 2 cores, one thread on core 0).
    The worker of an in-process engine gets none of that: it ran an OpenMP thread per core, beside the
    stage's own work and the server's, and every tiny parallel region of a small model woke the other
    thread. ``vllm serve`` of the tiny Qwen3 with ``--omni`` on 2 cores (``vllm bench serve``, 64 + 32
    tokens): 813 instead of 662 tokens/s at 1 request in flight, 5970 instead of 3510 at 16.
    """
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))


def _is_rendered(prompt: Any) -> bool:
    """Whether ``prompt`` is an ``EngineInput`` already (rendered by vLLM's renderer, e.g. in the server)."""
    return isinstance(prompt, dict) and prompt.get("type") in ("token", "embeds", "multimodal", "enc_dec")


AR_STAGE = ARStageKind()
