"""Worker side of hidden-state return: copy each opted-in request's rows, send them on.

The source is the model's main output (``execute_model_state.hidden_states``: the final, post-norm
hidden states) or, for any other layer, the auxiliary hidden-state outputs vLLM has for EAGLE-3: at
load, before any compile or warm-up, the model is asked for the residual stream entering decoder
layer ``k`` of each such layer as extra graph outputs. After each forward pass (``execute_model``
keeps its state for ``sample_tokens``) the rows of the step's tokens are copied for each request that
opted in:

- a request of an engine configured with one layer that asks for its prompt (``True``): into a host
  buffer ``(num_prompt_tokens, hidden)`` at their positions: chunked prefill fills it over several
  steps, a recompute after preemption rewrites the same rows. When the last prompt row is in, the
  buffer leaves with the step's ``ModelRunnerOutput`` (attribute ``prompt_hidden_states``), once;
- every other opted-in request (several layers configured, or ``"all"``): the step's rows of all those
  requests are gathered per layer and copied to the host at once, and each request's part leaves with
  this step's output (attribute ``hidden_state_rows``: ``HiddenStateRows``, its first position and a
  tensor per layer). The EngineCore assembles them (``vllm_omni.v1.core.sched.hidden_states``): only
  it knows when a request finishes. Prompt requests send prompt positions only.

Nothing is kept after the request finishes. The model-runner wraps that call this are shared with the
other captures (``vllm_omni.v1.worker.request_captures``); with the feature off the runner has no such
capturer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

from vllm_omni.config.prompt_hidden_states import (
    ALL_ROWS,
    aux_layer_indices,
    configured_layer,
    layer_tuple,
    request_mode,
    returns_dict,
)
from vllm_omni.v1.worker.runner_output import RequestCapture, attach

logger = logging.getLogger(__name__)

OUTPUT_ATTR = "prompt_hidden_states"  # on ModelRunnerOutput: {req_id: CPU tensor (P, hidden)}
ROWS_ATTR = "hidden_state_rows"  # on ModelRunnerOutput: {req_id: HiddenStateRows}
# Models without vLLM's SupportsEagle3 whose forward returns their language model's decoder output
# unchanged: the decoder's auxiliary outputs reach the runner as they do for an EAGLE-3 model.
_DECODER_OUTPUT_MODELS = ("Qwen2_5OmniThinkerForConditionalGeneration",)


@dataclass
class HiddenStateRows:
    """One step's rows of one request: positions ``first ..`` of each configured layer."""

    first: int
    rows: dict[int, torch.Tensor]  # layer as configured -> CPU tensor (num_rows, hidden)


class PromptHiddenStatesCapturer(RequestCapture):
    """Per-request capture state inside one worker's model runner.

    Args:
        layer: The requested layer, or list of layers, transformers indexing.
        aux_index: vLLM's auxiliary hidden-state index for it (a tuple, one per layer, for a list),
            ``None`` for the model's main output.
    """

    output_attr = OUTPUT_ATTR

    def __init__(self, layer: int | list[int], aux_index: int | None | tuple[int | None, ...]) -> None:
        self.layer = layer
        self.aux_index = aux_index
        self.layers = layer_tuple(layer)
        self.aux_indices = (aux_index,) if isinstance(layer, int) else tuple(aux_index)
        # vLLM returns the auxiliary outputs in ascending layer order, each once.
        self.aux_slots = sorted({index for index in self.aux_indices if index is not None})
        self.buffers: dict[str, torch.Tensor] = {}  # req_id -> (P, hidden) host rows, being filled
        self.pending: dict[str, torch.Tensor] = {}  # complete, not yet sent
        self.sent: set[str] = set()  # complete (sent or pending): a re-prefill is not captured again
        self.pending_rows: dict[str, HiddenStateRows] = {}  # this step's rows, sent with its output

    @classmethod
    def from_runner(cls, runner) -> PromptHiddenStatesCapturer | None:
        """A capturer for the configured layer(s) (bare test runners have no config: feature off)."""
        vllm_config = getattr(runner, "vllm_config", None)
        layer = None if vllm_config is None else configured_layer(vllm_config)
        if layer is None:
            return None
        indices = aux_layer_indices(layer, vllm_config.model_config.get_total_num_hidden_layers())
        return cls(layer, indices[0] if isinstance(layer, int) else indices)

    def after_load(self, runner) -> None:
        """Ask the model for the layers' auxiliary hidden states (none needed for the last layer)."""
        if self.aux_slots:
            enable_aux_output(runner, self)

    def after_execute(self, runner) -> None:
        """Copy the rows this step computed for every opted-in request of the batch."""
        state = runner.execute_model_state
        if state is None:  # no forward pass this step
            return
        sources = self._sources(state)
        batch, row_starts = runner.input_batch, runner.query_start_loc.np
        streamed = []  # (req_id, first position, first row in the batch, num_rows)
        for i, req_id in enumerate(batch.req_ids):
            request = runner.requests[req_id]
            mode = _mode(request)
            if mode is None:
                continue
            first, start = int(batch.num_computed_tokens_cpu[i]), int(row_starts[i])
            num_scheduled = state.scheduler_output.num_scheduled_tokens[req_id]
            num_rows = min(num_scheduled, request.num_prompt_tokens - first)
            if returns_dict(self.layer, mode):
                num_rows = num_scheduled if mode == ALL_ROWS else num_rows
                if num_rows > 0:
                    streamed.append((req_id, first, start, num_rows))
            elif num_rows > 0 and req_id not in self.sent:
                rows = sources[self.layer][start : start + num_rows]
                self._store(req_id, request.num_prompt_tokens, first, rows)
        if streamed:
            self._stream(sources, streamed)

    def attach_pending(self, output):
        output = super().attach_pending(output)
        return attach(output, ROWS_ATTR, self._take_rows) if self.pending_rows else output

    def tracked(self) -> tuple[dict | set, ...]:
        return self.buffers, self.pending, self.sent, self.pending_rows

    def _sources(self, state) -> dict[int, torch.Tensor]:
        """Each configured layer's rows of the whole batch (device tensors of this forward pass)."""
        pairs = zip(self.layers, self.aux_indices, strict=True)
        return {layer: self._source(state, index) for layer, index in pairs}

    def _source(self, state, aux_index: int | None) -> torch.Tensor:
        if aux_index is None:
            return state.hidden_states
        return state.aux_hidden_states[self.aux_slots.index(aux_index)]

    def _stream(self, sources: dict[int, torch.Tensor], streamed: list[tuple[str, int, int, int]]) -> None:
        """Gather the rows of ``streamed`` per layer, copy them to the host at once, split per request."""
        counts = [num_rows for *_, num_rows in streamed]
        per_layer = {}
        for layer, source in sources.items():
            gathered = torch.cat([source[start : start + n] for _, _, start, n in streamed])
            per_layer[layer] = gathered.to("cpu").split(counts)  # views of one host tensor per layer
        for i, (req_id, first, _, _) in enumerate(streamed):
            rows = {layer: parts[i] for layer, parts in per_layer.items()}
            self.pending_rows[req_id] = HiddenStateRows(first, rows)

    def _take_rows(self) -> dict[str, HiddenStateRows]:
        pending, self.pending_rows = self.pending_rows, {}
        return pending

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


def _mode(request) -> str | None:
    params = request.sampling_params
    return None if params is None else request_mode(params.extra_args)


def enable_aux_output(runner, capturer: PromptHiddenStatesCapturer) -> None:
    """Make the model return the auxiliary hidden states of ``capturer.aux_slots`` (at load time)."""
    layer = capturer.layer
    if runner.use_aux_hidden_state_outputs:
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs the model's auxiliary hidden-state outputs, which "
            "speculative decoding already uses; use layer -1 or another speculative method"
        )
    model = runner.get_model()
    eagle3 = supports_eagle3(model)
    if not eagle3 and type(model).__name__ not in _DECODER_OUTPUT_MODELS:
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs a model with vLLM's SupportsEagle3 interface "
            f"(auxiliary hidden-state outputs); {type(model).__name__} has none. Use layer -1."
        )
    runner.use_aux_hidden_state_outputs = True
    if eagle3:
        model.set_aux_hidden_state_layers(tuple(capturer.aux_slots))
    else:  # vLLM's own lookup of the decoder (language model -> .model), for a model without the flag
        SupportsEagle3.set_aux_hidden_state_layers(model, tuple(capturer.aux_slots))
