"""EngineCore side of per-layer hidden states: assemble each request's rows, attach them once.

The worker sends, every step, the rows it computed for each request whose hidden states go to
``CompletionOutput.hidden_states`` (several layers configured, or ``"all"`` asked): their first position
and a tensor per layer (``HiddenStateRows``). They are written at their positions into host buffers per
request and layer (chunked prefill fills them over several steps, a recompute after preemption rewrites
the same rows), growing as tokens are generated. The dict ``{layer: rows}`` goes on one output: a prompt
request's on its next output once every prompt row is in, an ``"all"`` request's on its final output
(``num_prompt_tokens + num_output_tokens - 1`` rows: every token the model was fed). Only the EngineCore
knows when a request finishes, hence the assembly here. Finished and aborted requests are forgotten
(``output_collectors``).
"""

from __future__ import annotations

import logging

import torch

from vllm_omni.config.prompt_hidden_states import ALL_ROWS, configured_layer, request_mode
from vllm_omni.v1.worker.prompt_hidden_states_capture import ROWS_ATTR, HiddenStateRows

logger = logging.getLogger(__name__)


class RequestRows:
    """One request's rows per layer, written by position into buffers that grow as needed.

    Args:
        num_prompt_tokens: The request's prompt length (the buffers' first size).
        num_wanted: Rows delivered for a prompt request (its prompt); ``None`` for an ``"all"``
            request (its row count is known when it finishes).
        max_rows: The most rows the request can have (prompt + max_tokens - 1): the buffers never grow
            past it.
    """

    def __init__(self, num_prompt_tokens: int, num_wanted: int | None, max_rows: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.num_wanted = num_wanted
        self.max_rows = max_rows
        self.buffers: dict[int, torch.Tensor] = {}
        self.num_filled = 0  # rows 0 .. num_filled - 1 are written
        self.done = False  # delivered (or impossible): later rows (a recompute) are ignored

    def write(self, request_id: str, chunk: HiddenStateRows) -> None:
        """Write ``chunk`` at its positions (a gap, e.g. rows never computed here, ends the request's
        capture with an error in the log)."""
        if self.done:
            return
        if chunk.first > self.num_filled:
            logger.error("hidden_states: %s has no rows %d..%d: not returned", request_id, self.num_filled,
                         chunk.first - 1)  # fmt: skip
            self.done = True
            return
        end = chunk.first + next(iter(chunk.rows.values())).shape[0]
        for layer, rows in chunk.rows.items():
            self._buffer(layer, rows, end)[chunk.first : end].copy_(rows)
        self.num_filled = max(self.num_filled, end)

    def take(self, num_rows: int) -> dict[int, torch.Tensor] | None:
        """The first ``num_rows`` rows of each layer (views, no copy), once."""
        self.done = True
        if self.num_filled < num_rows:
            return None
        return {layer: buffer[:num_rows] for layer, buffer in self.buffers.items()}

    def _buffer(self, layer: int, rows: torch.Tensor, end: int) -> torch.Tensor:
        buffer = self.buffers.get(layer)
        if buffer is None or buffer.shape[0] < end:
            size = self.num_prompt_tokens if buffer is None else 2 * buffer.shape[0]
            capacity = max(end, min(size, self.max_rows))
            grown = torch.empty((capacity, rows.shape[-1]), dtype=rows.dtype)
            if buffer is not None:
                grown[: self.num_filled].copy_(buffer[: self.num_filled])
            buffer = self.buffers[layer] = grown
        return buffer


class HiddenStatesCollector:
    """Per-request hidden-state rows assembled in the EngineCore until their request's output."""

    argument = "return_prompt_hidden_states"
    runner_attr = ROWS_ATTR
    output_attr = "hidden_states"

    @staticmethod
    def enabled(vllm_config) -> bool:
        """Whether the engine of ``vllm_config`` returns hidden states."""
        return configured_layer(vllm_config) is not None

    def __init__(self) -> None:
        self.requests: dict[str, tuple[object, RequestRows]] = {}  # req_id -> (Request, its rows)

    def add(self, request, chunk: HiddenStateRows) -> None:
        entry = self.requests.get(request.request_id)
        if entry is None:
            entry = self.requests[request.request_id] = (request, _new_rows(request))
        entry[1].write(request.request_id, chunk)

    def pop_ready(self, req_id: str, finished: bool) -> dict[int, torch.Tensor] | None:
        """The request's rows when they are complete: the prompt's, or every fed token's at the finish."""
        entry = self.requests.get(req_id)
        if entry is None or entry[1].done:
            return None
        request, rows = entry
        if rows.num_wanted is not None:
            return rows.take(rows.num_wanted) if rows.num_filled >= rows.num_wanted else None
        if not finished:
            return None
        del self.requests[req_id]
        ready = rows.take(request.num_tokens - 1)
        if ready is None:
            logger.error("hidden_states: %s finished with %d of %d rows: not returned", req_id,
                         rows.num_filled, request.num_tokens - 1)  # fmt: skip
        return ready

    def discard(self, req_id: str) -> None:
        self.requests.pop(req_id, None)


def _new_rows(request) -> RequestRows:
    num_prompt_tokens = request.num_prompt_tokens
    all_rows = request_mode(request.sampling_params.extra_args) == ALL_ROWS
    max_rows = num_prompt_tokens + max(request.max_tokens - 1, 0)
    return RequestRows(num_prompt_tokens, None if all_rows else num_prompt_tokens, max_rows)
