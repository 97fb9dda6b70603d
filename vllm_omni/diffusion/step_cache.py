"""First-block cache: skip most of the transformer on steps where its input barely changed.

Between neighbouring denoising steps the output of the first transformer block changes little, and so does
the residual the remaining blocks add to it. For every batch row (a request's conditional or unconditional
pass) the cache compares the first block's output with the one of that row's last fully computed step; if
the relative L1 change is below the threshold, the row reuses its cached residual instead of running the
other blocks. Decisions are per row, so requests at different steps share a forward pass and each keeps
its own cache (``DenoiseState.step_cache``), released with the request.

Installed by replacing the transformer's block list with a module that, while rows are bound, iterates as
two calls: the first block (which decides), then the remaining blocks on the rows that must compute.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FirstBlockCache(nn.Module):
    """Stands in for ``transformer.<blocks_attr>``; see the module docstring."""

    def __init__(self, transformer: nn.Module, blocks_attr: str, threshold: float) -> None:
        super().__init__()
        self.blocks = getattr(transformer, blocks_attr)
        self.threshold = threshold
        self.rows: list[dict[str, Any]] | None = None
        self.skipped = 0
        self.computed = 0
        setattr(transformer, blocks_attr, self)

    def bind(self, rows: list[dict[str, Any]]) -> None:
        """Per-row cache memories for the next forward pass, in batch-row order."""
        self.rows = rows

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        if self.rows is None or len(self.blocks) < 2:
            return iter(self.blocks)
        return iter((self._first_block, self._other_blocks))

    def _first_block(self, *args: Any, **kwargs: Any) -> Any:
        out = self.blocks[0](*args, **kwargs)
        self._joint, self._first = isinstance(out, tuple), _hidden(out)
        self._skip = [self._can_skip(row, self._first[i]) for i, row in enumerate(self.rows)]
        return out

    def _can_skip(self, row: dict[str, Any], first: torch.Tensor) -> bool:
        previous = row.get("first")
        if previous is None or previous.shape != first.shape:
            return False
        change = (first - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
        return bool(change < self.threshold)

    def _other_blocks(self, *args: Any, **kwargs: Any) -> Any:
        rows, skip, first = self.rows, self._skip, self._first
        self.rows = None
        compute = [i for i, s in enumerate(skip) if not s]
        hidden = first.clone()
        out = None
        if compute:
            index = torch.tensor(compute, device=first.device)
            out = _run(self.blocks[1:], *_select(args, kwargs, index, len(rows)))
            for j, i in enumerate(compute):
                hidden[i] = _hidden(out)[j]
                rows[i]["first"], rows[i]["residual"] = first[i].clone(), _hidden(out)[j] - first[i]
        for i in (i for i, s in enumerate(skip) if s):
            hidden[i] = first[i] + rows[i]["residual"]
        self.skipped += sum(skip)
        self.computed += len(compute)
        # Joint blocks return (encoder, hidden); the encoder stream is not used after the last block.
        return (None, hidden) if self._joint else hidden


def _hidden(out: Any) -> torch.Tensor:
    return out[1] if isinstance(out, tuple) else out


def _select(args: tuple, kwargs: dict, index: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, index)
        return value

    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def _run(blocks: nn.ModuleList, args: tuple, kwargs: dict) -> Any:
    """Chain ``blocks``: joint blocks return (encoder, hidden) and take them as keywords; others hidden."""
    out = None
    for block in blocks:
        out = block(*args, **kwargs)
        if isinstance(out, tuple):
            kwargs = {**kwargs, "encoder_hidden_states": out[0], "hidden_states": out[1]}
        else:
            args = (out, *args[1:])
    return out
