"""Worker side of mm_embedding: capture each request's encoder outputs and send them with the outputs.

vLLM's model runner stores every ``embed_multimodal`` output in ``encoder_cache[mm_hash]``, shared by
all requests with that item (a cache hit skips the encoder). So capture reads the cache at the moment
the runner gathers a request's items for its forward pass, which covers encoder runs, cache hits and
chunked prefill alike. Each item is pooled/cast as asked on its device and copied to the host once,
then leaves the worker in the next ``ModelRunnerOutput`` (attribute ``mm_embeddings``); nothing is kept
after a request finishes. With the feature off the wrappers call straight through.
"""

from __future__ import annotations

import logging

import torch

from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams
from vllm_omni.v1.worker.runner_output import RequestCapture

logger = logging.getLogger(__name__)

# req_id -> [(item index, modality, CPU tensor)], the attribute added to ModelRunnerOutput.
CapturedItems = dict[str, list[tuple[int, str, torch.Tensor]]]
OUTPUT_ATTR = "mm_embeddings"


class MMEmbeddingCapturer(RequestCapture):
    """Per-request capture state inside one worker's model runner."""

    def __init__(self) -> None:
        self.captured: dict[str, set[int]] = {}  # req_id -> item indices already copied
        self.pending: CapturedItems = {}  # copied, not yet sent
        self._params: dict[str, MMEmbeddingParams] = {}

    def capture(self, runner, scheduler_output, shift_computed_tokens: int = 0) -> None:
        """Copy the items that this step's forward reaches for the first time, per request."""
        for req_id in runner.input_batch.req_ids:
            state = runner.requests[req_id]
            if not state.mm_features:
                continue
            params = self._request_params(req_id, state)
            reached = (
                state.num_computed_tokens
                + shift_computed_tokens
                + scheduler_output.num_scheduled_tokens[req_id]
            )
            done = self.captured.setdefault(req_id, set())
            for index, feature in enumerate(state.mm_features):
                if index in done or feature.mm_position.offset >= reached:
                    continue
                done.add(index)
                if params.wants(feature.modality):
                    self._copy(runner, req_id, index, feature, params)

    def tracked(self) -> tuple[dict, ...]:
        return self.captured, self.pending, self._params

    def _request_params(self, req_id: str, state) -> MMEmbeddingParams:
        params = self._params.get(req_id)
        if params is None:
            extra_args = state.sampling_params.extra_args if state.sampling_params else None
            params = self._params[req_id] = MMEmbeddingParams.from_extra_args(extra_args)
        return params

    def _copy(self, runner, req_id, index, feature, params: MMEmbeddingParams) -> None:
        encoder_output = runner.encoder_cache.get(feature.identifier)
        if encoder_output is None:
            logger.warning("mm_embedding: encoder output of item %d of %s is not cached", index, req_id)
            return
        host = params.postprocess(encoder_output).to("cpu")
        if host.untyped_storage().data_ptr() == encoder_output.untyped_storage().data_ptr():
            # Still the cache's memory (CPU device, nothing to cast or pool): often a view of the
            # whole encoder batch, which would travel whole to the EngineCore. This is the one copy.
            host = host.clone()
        self.pending.setdefault(req_id, []).append((index, feature.modality, host))


def _capturer(runner) -> MMEmbeddingCapturer | None:
    """The runner's capturer, created on first use; ``None`` when the feature is off."""
    capturer = runner.__dict__.get("_omni_mm_capturer")
    if capturer is None:
        model_config = getattr(runner, "model_config", None)  # absent on bare runners of vLLM's unit tests
        mm_config = None if model_config is None else model_config.multimodal_config
        enabled = bool(getattr(mm_config, "enable_return_mm_embedding", False))
        capturer = runner._omni_mm_capturer = MMEmbeddingCapturer() if enabled else False
    return capturer or None


def _attach(runner, output):
    """Put pending captures on the step's ``ModelRunnerOutput`` (async wrappers included)."""
    capturer = _capturer(runner)
    return output if capturer is None else capturer.attach_pending(output, OUTPUT_ATTR)


def patch_model_runner(module) -> None:
    """Wrap ``GPUModelRunner`` (the base of the CPU runner too) to capture, send and free."""
    runner_cls = module.GPUModelRunner
    stock_gather = runner_cls._gather_mm_embeddings
    stock_update = runner_cls._update_states
    stock_execute = runner_cls.execute_model
    stock_sample = runner_cls.sample_tokens

    def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
        result = stock_gather(self, scheduler_output, shift_computed_tokens)
        capturer = _capturer(self)
        if capturer is not None:
            capturer.capture(self, scheduler_output, shift_computed_tokens)
        return result

    def _update_states(self, scheduler_output):
        capturer = _capturer(self)
        if capturer is not None:
            capturer.free_finished(scheduler_output)
        return stock_update(self, scheduler_output)

    def execute_model(self, *args, **kwargs):
        return _attach(self, stock_execute(self, *args, **kwargs))

    def sample_tokens(self, *args, **kwargs):
        return _attach(self, stock_sample(self, *args, **kwargs))

    runner_cls._gather_mm_embeddings = _gather_mm_embeddings
    runner_cls._update_states = _update_states
    runner_cls.execute_model = execute_model
    runner_cls.sample_tokens = sample_tokens
