"""Messages between the stage manager and stage processes; large tensors travel in shared memory.

``dumps`` pickles a message, except that every CPU tensor of at least ``threshold`` bytes is written
once into a new POSIX shared-memory segment (a file in /dev/shm) and pickled as a small handle (name,
shape, dtype). ``loads`` maps each segment, unlinks it and wraps the mapping as the tensor: no copy on
the receiving side, and the memory is freed with the tensor. A segment lives from one ``dumps`` to the
matching ``loads``; names start with the manager's prefix, so ``sweep`` can unlink whatever a dead process
left behind. Without a usable /dev/shm (absent, or full) a tensor is pickled inline. Everything else
(text, token ids, PIL images) is pickled as usual.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import torch

SHM_THRESHOLD_BYTES = 1 << 20
"""Tensors of at least this many bytes move through shared memory; smaller ones are pickled."""

SHM_DIR = Path("/dev/shm")


def new_segment_prefix() -> str:
    """A fresh name prefix for one pipeline's segments (this process's pid, then a random part)."""
    return f"vllm_omni_{os.getpid()}_{secrets.token_hex(4)}_"


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, threshold: int, prefix: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.threshold, self.prefix = threshold, prefix

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and _nbytes(obj) >= self.threshold:
            segment = _to_segment(obj, self.prefix)
            if segment is not None:
                return _attach, segment
        return NotImplemented


def dumps(message: Any, threshold: int = SHM_THRESHOLD_BYTES, prefix: str | None = None) -> bytes:
    """Pickle ``message``, moving CPU tensors of ``threshold`` bytes or more into shared memory."""
    buffer = io.BytesIO()
    _Pickler(buffer, threshold, prefix or new_segment_prefix()).dump(message)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The message of ``dumps``; its shared-memory segments become tensors (mapped, unlinked)."""
    return pickle.loads(data)


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (segments no ``loads`` consumed)."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _to_segment(tensor: torch.Tensor, prefix: str) -> tuple[str, tuple[int, ...], str] | None:
    """Write the tensor's bytes into a new segment; None when shared memory is unavailable or full."""
    name = prefix + secrets.token_hex(8)
    data = memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    try:
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return None
    try:
        written = 0
        while written < len(data):  # a tmpfs write: the kernel copies, no page faults in this process
            written += os.write(fd, data[written:])
    except OSError:  # e.g. a small /dev/shm is full: pickle this tensor instead
        os.unlink(SHM_DIR / name)
        return None
    finally:
        os.close(fd)
    return name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _attach(name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The segment as a tensor, without a copy: mapped, unlinked at once, freed with the tensor."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        size = os.fstat(fd).st_size
        torch_dtype = getattr(torch, dtype)
        if size == 0:
            return torch.empty(shape, dtype=torch_dtype)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch_dtype).view(shape)  # the tensor keeps the mapping
