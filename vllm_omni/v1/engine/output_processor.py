"""Frontend side of per-request outputs: from ``EngineCoreOutput`` fields to ``CompletionOutput``.

``mm_embedding``, ``prompt_hidden_states`` and ``hidden_states`` each arrive once from the EngineCore.
Delivery follows the request's output kind: ``DELTA`` streams carry each in exactly one output (the first
after it arrives, never later than the final one); cumulative streams carry it in every output from then
on (the same tensor, not a copy); ``FINAL_ONLY`` carries it in the final output.
"""

from collections.abc import Callable
from typing import Any

from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.output_processor import OutputProcessor, RequestState


def _deliver_mm_embedding(completion, received) -> None:
    completion.mm_embedding = received.embedding
    completion.mm_embedding_items = received.items()


def _deliver_prompt_hidden_states(completion, received) -> None:
    completion.prompt_hidden_states = received


def _deliver_hidden_states(completion, received) -> None:
    completion.hidden_states = received


# EngineCoreOutput field -> how it lands on the CompletionOutput.
DELIVERIES: dict[str, Callable[[Any, Any], None]] = {
    "mm_embedding": _deliver_mm_embedding,
    "prompt_hidden_states": _deliver_prompt_hidden_states,
    "hidden_states": _deliver_hidden_states,
}


class OmniRequestState(RequestState):
    """vLLM's per-request frontend state plus the per-request outputs waiting to be delivered."""

    def receive(self, field: str, value) -> None:
        """Keep ``value`` of EngineCoreOutput ``field`` for delivery."""
        self.__dict__.setdefault("omni_received", {})[field] = value

    def _new_completion_output(self, token_ids, finish_reason, stop_reason):
        output = super()._new_completion_output(token_ids, finish_reason, stop_reason)
        received = self.__dict__.get("omni_received")
        if received:
            delivered = self.__dict__.setdefault("omni_delivered", set())
            delta = self.output_kind == RequestOutputKind.DELTA
            for field, value in received.items():
                if not (delta and field in delivered):
                    DELIVERIES[field](output, value)
                    delivered.add(field)
        return output


_stock_process_outputs = OutputProcessor.process_outputs


def process_outputs(self: OutputProcessor, engine_core_outputs, *args, **kwargs):
    """Hand each arriving per-request output to its request's state, then run vLLM's processing."""
    for engine_core_output in engine_core_outputs:
        for field in DELIVERIES:
            value = getattr(engine_core_output, field, None)
            if value is not None:
                state = self.request_states.get(engine_core_output.request_id)
                if state is not None:
                    state.receive(field, value)
    return _stock_process_outputs(self, engine_core_outputs, *args, **kwargs)


def patch_output_processor(module) -> None:
    """Swap ``RequestState`` and wrap ``OutputProcessor.process_outputs``."""
    module.RequestState = OmniRequestState
    module.OutputProcessor.process_outputs = process_outputs
