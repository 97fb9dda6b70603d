"""Compiled transformer blocks: regional ``torch.compile`` with batch buckets.

Only the transformer's repeated blocks are compiled (each block list a family names), as diffusers'
``compile_repeated_blocks`` does: blocks of one structure share compiled graphs, so compile time is that of
a block or two, not of the model. Step-level batching changes the batch every step, so each compiled block
pads its batch-first inputs to the next bucket size (1, 2, 4, ... up to the largest batch of rows) by
repeating the last row, runs, and drops the padding rows: the batch dimension takes a few static sizes and
recompiles are bounded. Rows of a transformer block never mix (attention is within a row), so padding rows
do not change real rows beyond the kernels' own batch-size rounding.

The batch dimension is marked static; other dimensions follow dynamo's automatic dynamic shapes (the first
shape compiles a static graph per bucket, a second one a graph generic in those dimensions, which serves
every later shape) unless the family makes them uniform first (its ``compiled_block_args``, applied after
padding): Z-Image's token count changes with every caption length, so its blocks get a sequence dimension
marked dynamic from the first compile, and the warm-up's graphs (with an attention mask and without) serve
every caption and image size. Installed by setting each block's ``forward`` (the module tree and the
weights stay as loaded), so the step cache, which calls blocks one by one on a subset of rows, gets buckets
too.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vllm_omni.logger import init_logger

logger = init_logger(__name__)

BACKEND = "inductor"
"""The ``torch.compile`` backend (a test swaps it for one that fails)."""
PrepareArgs = Callable[[tuple, dict], tuple[tuple, dict]]
"""Makes a padded block call's ``(args, kwargs)`` what the compiled graphs take (a family's
``compiled_block_args``)."""
GRAPHS_PER_BUCKET = 8
"""Graphs one block's code may compile per bucket before dynamo stops compiling it: block variants (SD3's
last block differs, Z-Image's context refiner has no modulation) x a static and a shape-generic graph x an
attention mask or none (Z-Image: generic graphs only, with and without a mask per variant)."""


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of two below ``max_rows``, then ``max_rows``."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return (*sizes, max_rows)


class BucketedForward:
    """Stands in for one block's ``forward``: pads the batch to a bucket, runs the compiled forward, trims."""

    def __init__(
        self,
        eager: Callable[..., Any],
        compiled: Callable[..., Any],
        buckets: tuple[int, ...],
        prepare: PrepareArgs = lambda args, kwargs: (args, kwargs),
    ):
        self.eager = eager
        self.compiled = compiled
        self.buckets = buckets
        self.prepare = prepare

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        index = bisect.bisect_left(self.buckets, batch)
        if index == len(self.buckets):  # more rows than the stage ever batches: no new graph for them
            return self.eager(*args, **kwargs)
        size = self.buckets[index]
        args = tuple(_pad(a, batch, size) for a in args)
        kwargs = {k: _pad(v, batch, size) for k, v in kwargs.items()}
        args, kwargs = self.prepare(args, kwargs)
        _mark_batch_static((*args, *kwargs.values()), size)
        return _trim(self.compiled(*args, **kwargs), size, batch)


class CompiledBlocks:
    """The compiled block lists of one transformer; ``disable`` puts the eager forwards back."""

    def __init__(
        self, transformer: nn.Module, block_lists: tuple[str, ...], max_rows: int, prepare: PrepareArgs
    ) -> None:
        """``prepare``: the family's ``compiled_block_args`` (applied to each padded call)."""
        self.buckets = batch_buckets(max_rows)
        self.blocks = [block for name in block_lists for block in getattr(transformer, name)]
        limit = GRAPHS_PER_BUCKET * len(self.buckets)
        # Global and only ever raised: every block of a class shares one code object and its graphs.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for block in self.blocks:
            compiled = torch.compile(block.forward, backend=BACKEND, dynamic=None)
            block.forward = BucketedForward(block.forward, compiled, self.buckets, prepare)

    def disable(self) -> None:
        """Run the blocks eagerly again (the fallback when compiling fails)."""
        for block in self.blocks:
            del block.forward  # the instance attribute: the class's forward again


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can); the compile itself may still fail."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} cannot compile on this Python"
    if device == "cuda" and not _has_triton():
        return "inductor needs triton on CUDA and it is not installed"
    return None


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels between starts (``TORCHINDUCTOR_CACHE_DIR`` moves it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The batch of a block call: its first tensor's first dimension (hidden states come first)."""
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0]


def _pad(value: Any, batch: int, size: int) -> Any:
    """``value`` with its last row repeated up to ``size`` rows, when it is a batch-first tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch or size == batch:
        return value
    return torch.cat([value, value[-1:].expand(size - batch, *value.shape[1:])])


def _mark_batch_static(values: tuple, size: int) -> None:
    """Mark the batch dimension static on every batch-first tensor (those the family made too): graphs are
    per bucket, and a tensor marked on one call and not on the next would fail the graph's guards."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            torch._dynamo.mark_static(value, 0)


def _trim(out: Any, size: int, batch: int) -> Any:
    if isinstance(out, tuple):
        return tuple(_trim(o, size, batch) for o in out)
    if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == size and size > batch:
        return out[:batch]
    return out
