"""Per-request data a worker sends to the EngineCore as an extra attribute of ``ModelRunnerOutput``.

The attribute travels with vLLM's own output (pickled with it to the EngineCore process), so nothing
crosses processes on the side. The features that send data this way call ``attach`` from their
``sample_tokens`` / ``execute_model`` wraps.
"""

import copy
from collections.abc import Callable
from typing import Any


class RequestCapture:
    """Per-request state of a worker-side capture: ``pending`` (ready to send) plus the containers
    ``tracked`` names (dicts or sets keyed by request id), all dropped together when a request ends."""

    pending: dict[str, Any]

    def tracked(self) -> tuple[dict | set, ...]:
        """Every per-request container, ``pending`` included."""
        raise NotImplementedError

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

    def attach_pending(self, output, name: str):
        """``attach`` what is pending as ``name`` on the step's output (unchanged when nothing is)."""
        return attach(output, name, self.take) if self.pending else output


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
