"""Worker side of prompt hidden states: copy each opted-in request's prompt rows, send them once.

The source is the model's main output (``execute_model_state.hidden_states``: the final, post-norm
hidden states) or, for any other layer, the auxiliary hidden-state output vLLM has for EAGLE-3: at
load, before any compile or warm-up, the model is asked for the residual stream entering decoder
layer ``k`` as an extra graph output. After each forward pass (``execute_model`` keeps its state for
``sample_tokens``) the rows of the step's prompt tokens are copied, per request, into a host buffer
``(num_prompt_tokens, hidden)`` at their positions: chunked prefill fills it over several steps, a
recompute after preemption rewrites the same rows. When the last prompt row is in, the buffer leaves
with the step's ``ModelRunnerOutput`` (attribute ``prompt_hidden_states``), once per request; nothing
is kept after the request finishes. The model-runner wraps that call it are shared with the other
captures (``vllm_omni.v1.worker.request_captures``); with the feature off the runner has no such capturer.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models.interfaces import supports_eagle3

from vllm_omni.config.prompt_hidden_states import aux_layer_index, configured_layer, requested
from vllm_omni.v1.worker.runner_output import RequestCapture

logger = logging.getLogger(__name__)

OUTPUT_ATTR = "prompt_hidden_states"  # on ModelRunnerOutput: {req_id: CPU tensor (P, hidden)}


class PromptHiddenStatesCapturer(RequestCapture):
    """Per-request capture state inside one worker's model runner.

    Args:
        layer: The requested layer, transformers indexing.
        aux_index: vLLM's auxiliary hidden-state index for it, ``None`` for the model's main output.
    """

    output_attr = OUTPUT_ATTR

    def __init__(self, layer: int, aux_index: int | None) -> None:
        self.layer = layer
        self.aux_index = aux_index
        self.buffers: dict[str, torch.Tensor] = {}  # req_id -> (P, hidden) host rows, being filled
        self.pending: dict[str, torch.Tensor] = {}  # complete, not yet sent
        self.sent: set[str] = set()  # complete (sent or pending): a re-prefill is not captured again

    @classmethod
    def from_runner(cls, runner) -> PromptHiddenStatesCapturer | None:
        """A capturer for the configured layer (bare test runners have no config: feature off)."""
        vllm_config = getattr(runner, "vllm_config", None)
        layer = None if vllm_config is None else configured_layer(vllm_config)
        if layer is None:
            return None
        return cls(layer, aux_layer_index(layer, vllm_config.model_config.get_total_num_hidden_layers()))

    def after_load(self, runner) -> None:
        """Ask the model for the layer's auxiliary hidden states (none needed for the last layer)."""
        if self.aux_index is not None:
            enable_aux_output(runner, self)

    def after_execute(self, runner) -> None:
        """Copy the prompt rows this step computed for every opted-in request of the batch."""
        state = runner.execute_model_state
        if state is None:  # no forward pass this step
            return
        source = state.hidden_states if self.aux_index is None else state.aux_hidden_states[0]
        batch, row_starts = runner.input_batch, runner.query_start_loc.np
        for i, req_id in enumerate(batch.req_ids):
            request = runner.requests[req_id]
            if req_id in self.sent or not _opted_in(request):
                continue
            first = int(batch.num_computed_tokens_cpu[i])
            num_scheduled = state.scheduler_output.num_scheduled_tokens[req_id]
            num_rows = min(num_scheduled, request.num_prompt_tokens - first)
            if num_rows > 0:
                start = int(row_starts[i])
                self._store(req_id, request.num_prompt_tokens, first, source[start : start + num_rows])

    def tracked(self) -> tuple[dict | set, ...]:
        return self.buffers, self.pending, self.sent

    def _store(self, req_id: str, num_prompt_tokens: int, first: int, rows: torch.Tensor) -> None:
        buffer = self.buffers.get(req_id)
        if buffer is None:
            if first != 0:  # rows before `first` were never computed here (a prefix-cache hit?)
                logger.error("prompt_hidden_states: %s starts at token %d: not returned", req_id, first)
                self.sent.add(req_id)
                return
            buffer = self.buffers[req_id] = torch.empty(
                (num_prompt_tokens, rows.shape[-1]), dtype=rows.dtype, device="cpu"
            )
        # Copied now: the next step reuses the source's memory (CUDA-graph and compiled outputs).
        buffer[first : first + rows.shape[0]].copy_(rows)
        if first + rows.shape[0] == num_prompt_tokens:
            self.pending[req_id] = self.buffers.pop(req_id)
            self.sent.add(req_id)


def _opted_in(request) -> bool:
    params = request.sampling_params
    return params is not None and requested(params.extra_args)


def enable_aux_output(runner, capturer: PromptHiddenStatesCapturer) -> None:
    """Make the model return the auxiliary hidden states of ``capturer.aux_index`` (at load time)."""
    layer = capturer.layer
    if runner.use_aux_hidden_state_outputs:
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs the model's auxiliary hidden-state outputs, which "
            "speculative decoding already uses; use layer -1 or another speculative method"
        )
    model = runner.get_model()
    if not supports_eagle3(model):
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs a model with vLLM's SupportsEagle3 interface "
            f"(auxiliary hidden-state outputs); {type(model).__name__} has none. Use layer -1."
        )
    runner.use_aux_hidden_state_outputs = True
    model.set_aux_hidden_state_layers((capturer.aux_index,))
