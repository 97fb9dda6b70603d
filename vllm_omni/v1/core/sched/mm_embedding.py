"""EngineCore side of mm_embedding: collect a request's items from the workers, emit them once.

Items arrive on ``ModelRunnerOutput.mm_embeddings`` during the request's prefill (possibly over
several chunked-prefill steps). When the request emits its first ``EngineCoreOutput`` with all
expected items in, they are concatenated in prompt order into ``EngineCoreOutput.mm_embedding`` and
forgotten. Requests that finish or abort are forgotten too (``Scheduler._free_request``). The
scheduler that drives it is shared with the other per-request outputs (``output_collectors``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vllm_omni.config.multimodal import returns_mm_embedding
from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams
from vllm_omni.v1.engine.outputs import MMEmbeddingOutput
from vllm_omni.v1.worker.mm_embedding_capture import OUTPUT_ATTR

logger = logging.getLogger(__name__)


@dataclass
class _Collected:
    expected: int
    items: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)


class MMEmbeddingCollector:
    """Per-request items waiting in the EngineCore for their request's next output."""

    argument = "enable_return_mm_embedding"
    enabled = staticmethod(returns_mm_embedding)
    runner_attr = OUTPUT_ATTR
    output_attr = "mm_embedding"

    def __init__(self) -> None:
        self.requests: dict[str, _Collected] = {}

    def add(self, request, items) -> None:
        entry = self.requests.get(request.request_id)
        if entry is None:
            params = MMEmbeddingParams.from_extra_args(request.sampling_params.extra_args)
            entry = self.requests[request.request_id] = _Collected(params.num_wanted(request.mm_features))
        for index, modality, tensor in items:
            entry.items.setdefault(index, (modality, tensor))

    def pop_ready(self, req_id: str, finished: bool) -> MMEmbeddingOutput | None:
        """The request's embeddings if all are in (or it is finishing), removing them."""
        entry = self.requests.get(req_id)
        if entry is None or (len(entry.items) < entry.expected and not finished):
            return None
        del self.requests[req_id]
        if len(entry.items) < entry.expected:
            logger.warning("mm_embedding: %s finished with %d of %d items", req_id, len(entry.items),
                           entry.expected)  # fmt: skip
        indices = sorted(entry.items)
        return MMEmbeddingOutput(
            embedding=torch.cat([entry.items[i][1] for i in indices]),
            modalities=[entry.items[i][0] for i in indices],
            indices=indices,
            lengths=[entry.items[i][1].shape[0] for i in indices],
        )

    def discard(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
