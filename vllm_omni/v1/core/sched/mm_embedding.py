"""EngineCore side of mm_embedding: collect a request's items from the workers, emit them once.

Items arrive on ``ModelRunnerOutput.mm_embeddings`` during the request's prefill (possibly over
several chunked-prefill steps). When the request emits its first ``EngineCoreOutput`` with all
expected items in, they are concatenated in prompt order into ``EngineCoreOutput.mm_embedding`` and
forgotten. Requests that finish or abort are forgotten too (``Scheduler._free_request``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

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


def _collector(scheduler) -> MMEmbeddingCollector:
    collector = scheduler.__dict__.get("_omni_mm_collector")
    if collector is None:
        collector = scheduler._omni_mm_collector = MMEmbeddingCollector()
    return collector


def patch_scheduler(module) -> None:
    """Wrap ``Scheduler.update_from_output`` (collect, then attach) and ``_free_request`` (forget)."""
    scheduler_cls = module.Scheduler
    stock_update = scheduler_cls.update_from_output
    stock_free = scheduler_cls._free_request

    def update_from_output(self, scheduler_output, model_runner_output):
        received = getattr(model_runner_output, OUTPUT_ATTR, None)
        collector = self.__dict__.get("_omni_mm_collector")
        if received:
            collector = _collector(self)
            for req_id, items in received.items():
                request = self.requests.get(req_id)
                if request is not None:
                    collector.add(request, items)
        self._omni_updating = True
        try:
            engine_core_outputs = stock_update(self, scheduler_output, model_runner_output)
        finally:
            self._omni_updating = False
        if collector is not None and collector.requests:
            for outputs in engine_core_outputs.values():
                for output in outputs.outputs:
                    ready = collector.pop_ready(output.request_id, output.finished)
                    if ready is not None:
                        output.mm_embedding = ready
            # Requests freed during this update were kept until their last output was built.
            for req_id in [r for r in collector.requests if r not in self.requests]:
                collector.discard(req_id)
        return engine_core_outputs

    def _free_request(self, request, *args, **kwargs):
        # Inside update_from_output the request's final output is not built yet: forget it after.
        collector = self.__dict__.get("_omni_mm_collector")
        if collector is not None and not self.__dict__.get("_omni_updating"):
            collector.discard(request.request_id)
        return stock_free(self, request, *args, **kwargs)

    scheduler_cls.update_from_output = update_from_output
    scheduler_cls._free_request = _free_request
