"""Frontend side of mm_embedding: from ``EngineCoreOutput.mm_embedding`` to ``CompletionOutput``.

Delivery follows the request's output kind: ``DELTA`` streams carry the embedding in exactly one
output (the first after it arrives, never later than the final one); cumulative streams carry it in
every output from then on (the same tensor, not a copy); ``FINAL_ONLY`` carries it in the final output.
"""

from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.output_processor import OutputProcessor, RequestState


class OmniRequestState(RequestState):
    """vLLM's per-request frontend state plus the embedding waiting to be delivered."""

    mm_embedding = None  # MMEmbeddingOutput, set when it arrives from the EngineCore
    mm_embedding_delivered = False

    def _new_completion_output(self, token_ids, finish_reason, stop_reason):
        output = super()._new_completion_output(token_ids, finish_reason, stop_reason)
        received = self.mm_embedding
        if received is not None:
            delta = self.output_kind == RequestOutputKind.DELTA
            if not (delta and self.mm_embedding_delivered):
                output.mm_embedding = received.embedding
                output.mm_embedding_items = received.items()
                self.mm_embedding_delivered = True
        return output


_stock_process_outputs = OutputProcessor.process_outputs


def process_outputs(self: OutputProcessor, engine_core_outputs, *args, **kwargs):
    """Hand each arriving embedding to its request's state, then run vLLM's output processing."""
    for engine_core_output in engine_core_outputs:
        received = getattr(engine_core_output, "mm_embedding", None)
        if received is not None:
            state = self.request_states.get(engine_core_output.request_id)
            if state is not None:
                state.mm_embedding = received
    return _stock_process_outputs(self, engine_core_outputs, *args, **kwargs)


def patch_output_processor(module) -> None:
    """Swap ``RequestState`` and wrap ``OutputProcessor.process_outputs``."""
    module.RequestState = OmniRequestState
    module.OutputProcessor.process_outputs = process_outputs
