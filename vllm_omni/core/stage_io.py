"""Messages between the stage manager and stage processes; large tensors travel in shared memory.

``dumps`` pickles a message, except that every CPU tensor of at least ``threshold`` bytes is copied once
into a fresh POSIX shared-memory segment and pickled as a small handle (name, shape, dtype). ``loads``
copies each segment into a new tensor and unlinks it, so a segment lives from one ``dumps`` to the
matching ``loads``. Segment names start with the manager's prefix, so ``sweep`` can unlink whatever a dead
process left behind. Everything else (text, token ids, PIL images) is pickled as usual.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import torch

SHM_THRESHOLD_BYTES = 1 << 20
"""Tensors of at least this many bytes move through shared memory; smaller ones are pickled."""

SHM_DIR = Path("/dev/shm")


def segment_prefix(owner_pid: int) -> str:
    """Name prefix of the segments of the pipeline whose manager runs in ``owner_pid``."""
    return f"vllm_omni_{owner_pid}_"


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, threshold: int, prefix: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.threshold, self.prefix = threshold, prefix

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and _nbytes(obj) >= self.threshold:
            return _attach, _to_segment(obj, self.prefix)
        return NotImplemented


def dumps(message: Any, threshold: int = SHM_THRESHOLD_BYTES, prefix: str | None = None) -> bytes:
    """Pickle ``message``, moving CPU tensors of ``threshold`` bytes or more into shared memory."""
    buffer = io.BytesIO()
    _Pickler(buffer, threshold, prefix or segment_prefix(os.getpid())).dump(message)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The message of ``dumps``; its shared-memory segments are copied out and unlinked."""
    return pickle.loads(data)


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (segments no ``loads`` consumed)."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            segment = shared_memory.SharedMemory(name=path.name)
        except FileNotFoundError:
            continue
        segment.close()
        segment.unlink()
        removed += 1
    return removed


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _to_segment(tensor: torch.Tensor, prefix: str) -> tuple[str, tuple[int, ...], str]:
    name = prefix + secrets.token_hex(8)
    size = max(_nbytes(tensor), 1)
    segment = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=_nbytes(tensor))
        view.copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
        del view
    finally:
        segment.close()
    return name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _attach(name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    segment = shared_memory.SharedMemory(name=name)
    try:
        torch_dtype = getattr(torch, dtype)
        count = torch.Size(shape).numel()
        view = torch.frombuffer(segment.buf, dtype=torch_dtype, count=count) if count else None
        tensor = view.clone().view(shape) if view is not None else torch.empty(shape, dtype=torch_dtype)
        del view
    finally:
        segment.close()
        segment.unlink()
    return tensor
