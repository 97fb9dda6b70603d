"""EngineCore side of prompt hidden states: hand a request's rows to its next output, once.

The worker sends a request's ``(num_prompt_tokens, hidden)`` tensor on ``ModelRunnerOutput`` in the
step that computes its last prompt token, the step that also emits its first ``EngineCoreOutput``; the
tensor goes into that output's ``prompt_hidden_states`` field (or the next output, should that step
emit none) and is forgotten, as are requests that finish or abort first (``output_collectors``).
"""

import torch

from vllm_omni.config.prompt_hidden_states import configured_layer
from vllm_omni.v1.worker.prompt_hidden_states_capture import OUTPUT_ATTR


class PromptHiddenStatesCollector:
    """Per-request prompt hidden states waiting in the EngineCore for their request's next output."""

    argument = "return_prompt_hidden_states"
    runner_attr = OUTPUT_ATTR
    output_attr = "prompt_hidden_states"

    @staticmethod
    def enabled(vllm_config) -> bool:
        """Whether the engine of ``vllm_config`` returns prompt hidden states."""
        return configured_layer(vllm_config) is not None

    def __init__(self) -> None:
        self.requests: dict[str, torch.Tensor] = {}

    def add(self, request, hidden_states: torch.Tensor) -> None:
        self.requests.setdefault(request.request_id, hidden_states)

    def pop_ready(self, req_id: str, finished: bool) -> torch.Tensor | None:
        """The request's hidden states if they arrived, removing them."""
        return self.requests.pop(req_id, None)

    def discard(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
