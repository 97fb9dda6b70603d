"""Worker side of mm_embedding: capture each request's encoder outputs and send them with the outputs.

vLLM's model runner stores every ``embed_multimodal`` output in ``encoder_cache[mm_hash]``, shared by
all requests with that item (a cache hit skips the encoder). So capture reads the cache at the moment
the runner gathers a request's items for its forward pass, which covers encoder runs, cache hits and
chunked prefill alike. Each item is pooled/cast as asked on its device and copied to the host once,
then leaves the worker in the next ``ModelRunnerOutput`` (attribute ``mm_embeddings``); nothing is kept
after a request finishes. The model-runner wraps that call it are shared with the other captures
(``vllm_omni.v1.worker.request_captures``); with the feature off the runner has no such capturer.
"""

from __future__ import annotations

import logging

import torch

from vllm_omni.config.multimodal import returns_mm_embedding
from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams
from vllm_omni.v1.worker.runner_output import RequestCapture

logger = logging.getLogger(__name__)

# req_id -> [(item index, modality, CPU tensor)], the attribute added to ModelRunnerOutput.
CapturedItems = dict[str, list[tuple[int, str, torch.Tensor]]]
OUTPUT_ATTR = "mm_embeddings"


class MMEmbeddingCapturer(RequestCapture):
    """Per-request capture state inside one worker's model runner."""

    output_attr = OUTPUT_ATTR

    def __init__(self) -> None:
        self.captured: dict[str, set[int]] = {}  # req_id -> item indices already copied
        self.pending: CapturedItems = {}  # copied, not yet sent
        self._params: dict[str, MMEmbeddingParams] = {}

    @classmethod
    def from_runner(cls, runner) -> MMEmbeddingCapturer | None:
        """A capturer when the runner's engine returns mm embeddings (bare test runners have no config)."""
        return cls() if returns_mm_embedding(getattr(runner, "vllm_config", None)) else None

    def after_gather(self, runner, scheduler_output, shift_computed_tokens: int = 0) -> None:
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
