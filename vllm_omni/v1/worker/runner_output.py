"""Per-request data a worker sends to the EngineCore as an extra attribute of ``ModelRunnerOutput``.

The attribute travels with vLLM's own output (pickled with it to the EngineCore process), so nothing
crosses processes on the side. Each feature that sends data this way defines a ``RequestCapture``
subclass: how it is created from the model runner (``None`` when the feature is off), the hooks it
needs and its ``output_attr``. ``vllm_omni.v1.worker.request_captures`` installs the model-runner wraps
that drive every capture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any


class RequestCapture:
    """Per-request state of a worker-side capture: ``pending`` (ready to send) plus the containers
    ``tracked`` names (dicts or sets keyed by request id), all dropped together when a request ends.

    The ``after_*`` hooks run right after the model-runner method they name; they do nothing unless a
    subclass overrides them.
    """

    output_attr: str  # the ModelRunnerOutput attribute the data travels in: {req_id: data}
    pending: dict[str, Any]

    @classmethod
    def from_runner(cls, runner) -> RequestCapture | None:
        """The capture for ``runner``'s engine, ``None`` when its feature is off there."""
        raise NotImplementedError

    def tracked(self) -> tuple[dict | set, ...]:
        """Every per-request container, ``pending`` included."""
        raise NotImplementedError

    def after_load(self, runner) -> None:
        """After the model is loaded (``_setup_eagle3_aux_hidden_state_outputs``), before any compile."""

    def after_gather(self, runner, scheduler_output, shift_computed_tokens: int = 0) -> None:
        """After the step's multimodal embeddings are gathered (``_gather_mm_embeddings``)."""

    def after_execute(self, runner) -> None:
        """After the forward pass (``execute_model``; its state waits for ``sample_tokens``)."""

    def take(self) -> dict[str, Any] | None:
        """What became ready since the last call (``None`` when nothing did)."""
        if not self.pending:
            return None
        pending, self.pending = self.pending, {}
        return pending

    def free(self, req_ids) -> None:
        """Forget finished or aborted requests."""
        for container in self.tracked():
            for req_id in req_ids:
                if isinstance(container, dict):
                    container.pop(req_id, None)
                else:
                    container.discard(req_id)

    def num_tracked(self) -> int:
        """Requests with capture state (0 once every request has finished)."""
        return len(set().union(*self.tracked()))

    def free_finished(self, scheduler_output) -> None:
        """Forget the requests the scheduler reports finished (called before ``_update_states``)."""
        if scheduler_output.finished_req_ids:
            self.free(scheduler_output.finished_req_ids)

    def attach_pending(self, output):
        """``attach`` what is pending as ``output_attr`` on the step's output (unchanged when nothing is)."""
        return attach(output, self.output_attr, self.take) if self.pending else output


def attach(output, name: str, take: Callable[[], Any]):
    """Set ``name`` to ``take()`` on the step's ``ModelRunnerOutput`` and return the output to hand on.

    Handles the async wrapper (``AsyncModelRunnerOutput``), leaves non-final pipeline ranks'
    ``IntermediateTensors`` alone (``take`` is not called then), and never mutates vLLM's shared
    ``EMPTY_MODEL_RUNNER_OUTPUT``.
    """
    if output is None:
        return output
    target = getattr(output, "_model_runner_output", output)
    if not hasattr(target, "req_id_to_index"):  # IntermediateTensors on a non-last PP rank
        return output
    if target is output and not target.req_ids:
        target = output = copy.copy(output)  # never mutate vLLM's shared EMPTY_MODEL_RUNNER_OUTPUT
    setattr(target, name, take())
    return output


def check_model_runner(vllm_config, arguments: list[str]) -> None:
    """Refuse engines whose workers would run a model runner the captures do not hook.

    The captures hook vLLM's V1 ``GPUModelRunner`` (the CPU runner's base); Model Runner V2, vLLM's
    default on GPUs with Triton, is another class: the features would silently return nothing.
    """
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            f"{', '.join(arguments)}: not supported with vLLM's Model Runner V2, which this engine would "
            "use; set VLLM_USE_V2_MODEL_RUNNER=0 (the V1 model runner)"
        )
