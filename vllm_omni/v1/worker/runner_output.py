"""Per-request data a worker sends to the EngineCore as an extra attribute of ``ModelRunnerOutput``.

The attribute travels with vLLM's own output (pickled with it to the EngineCore process), so nothing
crosses processes on the side. The features that send data this way call ``attach`` from their
``sample_tokens`` / ``execute_model`` wraps.
"""

import copy
from collections.abc import Callable
from typing import Any


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
