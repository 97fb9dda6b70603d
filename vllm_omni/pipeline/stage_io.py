"""Pickling of stage messages; large tensors travel in shared memory, written once per pipeline.

``dumps`` pickles a message, except that every CPU tensor of at least ``threshold`` bytes is written
once into a new POSIX shared-memory segment (a file in /dev/shm) and pickled as a small handle (name,
shape, dtype). ``loads`` maps each segment copy-on-write as the tensor (no copy; a write by the receiver
stays its own) and unlinks it: the memory is freed with the last tensor that maps it.

The manager only passes tensors on: ``loads(..., keep=names)`` maps without unlinking and tags each
tensor with its segment, so that when the manager hands the tensor to the next stage, ``dumps`` sends the
same handle instead of writing the bytes again; the next stage unlinks it. What the manager kept and did
not pass on it unlinks itself (``unlink``). Names start with the pipeline's prefix, so ``sweep`` removes
whatever a dead process left behind. Without a usable /dev/shm (absent, or full) a tensor is pickled
inline. Everything else (text, token ids, PIL images) is pickled as usual.

``SharedMemoryCodec`` bundles these for one pipeline (its prefix and threshold); it is the local
launcher's :class:`MessageCodec`. Ray's launcher has its own (``vllm_omni.pipeline.object_store_io``).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

SHM_THRESHOLD_BYTES = 1 << 20
"""Tensors of at least this many bytes move through shared memory; smaller ones are pickled."""

SHM_DIR = Path("/dev/shm")
_SEGMENT_ATTR = "_omni_segment"  # on a tensor the manager mapped without unlinking: its segment's name


def new_segment_prefix() -> str:
    """A fresh name prefix for one pipeline's segments (this process's pid, then a random part)."""
    return f"vllm_omni_{os.getpid()}_{secrets.token_hex(4)}_"


class MessageCodec(Protocol):
    """How one pipeline's messages travel between the manager and its stages (both ends use it).

    ``dumps`` makes what a stage handle sends; ``loads`` reads it. With ``keep`` (the manager) tensors are
    loaded so that ``dumps`` passes them on without copying, and ``forwarded`` collects what was passed
    on; what was kept and not passed on is ``release``d. ``sweep`` frees what dead processes left behind.
    """

    def dumps(self, message: Any, forwarded: list | None = None) -> Any: ...

    def loads(self, data: Any, keep: list | None = None) -> Any: ...

    def release(self, kept: list) -> None: ...

    def sweep(self) -> None: ...


@dataclass(frozen=True)
class SharedMemoryCodec:
    """Messages as bytes, large tensors in /dev/shm segments named with one pipeline's prefix."""

    threshold: int = SHM_THRESHOLD_BYTES
    """Tensors of at least this many bytes travel in shared memory."""
    prefix: str = field(default_factory=lambda: new_segment_prefix())
    """The pipeline's segment name prefix."""

    def dumps(self, message: Any, forwarded: list[str] | None = None) -> bytes:
        return dumps(message, self.threshold, self.prefix, forwarded)

    def loads(self, data: bytes, keep: list[str] | None = None) -> Any:
        return loads(data, keep)

    def release(self, kept: list[str]) -> None:
        unlink(kept)

    def sweep(self) -> None:
        sweep(self.prefix)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, threshold: int, prefix: str, forwarded: list[str] | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.threshold, self.prefix, self.forwarded = threshold, prefix, forwarded

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            return NotImplemented
        name = obj.__dict__.pop(_SEGMENT_ATTR, None)
        if name is not None:  # passed on: the receiver maps the sender's segment
            if self.forwarded is not None:
                self.forwarded.append(name)
            return _attach, (name, tuple(obj.shape), _dtype_name(obj))
        if _nbytes(obj) >= self.threshold:
            segment = _to_segment(obj, self.prefix)
            if segment is not None:
                return _attach, segment
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    """Maps segments without unlinking them, tagging each tensor with its segment's name."""

    def __init__(self, file: io.BytesIO, kept: list[str]) -> None:
        super().__init__(file)
        self.kept = kept

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_attach":
            return self._attach_kept
        return super().find_class(module, name)

    def _attach_kept(self, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        tensor = _attach(name, shape, dtype, unlink=False)
        tensor.__dict__[_SEGMENT_ATTR] = name
        self.kept.append(name)
        return tensor


def dumps(
    message: Any,
    threshold: int = SHM_THRESHOLD_BYTES,
    prefix: str | None = None,
    forwarded: list[str] | None = None,
) -> bytes:
    """Pickle ``message``, moving CPU tensors of ``threshold`` bytes or more into shared memory.

    A tensor ``loads(..., keep=...)`` mapped is passed on by its segment's name (no copy), once; those
    names are appended to ``forwarded``: their new owner is the receiver.
    """
    buffer = io.BytesIO()
    _Pickler(buffer, threshold, prefix or new_segment_prefix(), forwarded).dump(message)
    return buffer.getvalue()


def loads(data: bytes, keep: list[str] | None = None) -> Any:
    """The message of ``dumps``; its segments become tensors, unlinked at once, or, with ``keep``, left
    in place for ``dumps`` to pass on (their names are appended to ``keep``; ``unlink`` them when done)."""
    if keep is None:
        return pickle.loads(data)
    return _Unpickler(io.BytesIO(data), keep).load()


def unlink(names: list[str]) -> None:
    """Remove kept segments (their mapped tensors stay valid; the memory goes with the last of them)."""
    for name in names:
        (SHM_DIR / name).unlink(missing_ok=True)


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (segments no ``loads`` consumed)."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


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
    return name, tuple(tensor.shape), _dtype_name(tensor)


def _attach(name: str, shape: tuple[int, ...], dtype: str, unlink: bool = True) -> torch.Tensor:
    """The segment as a tensor, without a copy: mapped copy-on-write, freed with the tensor."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDONLY)
    try:
        if unlink:
            os.unlink(path)
        size = os.fstat(fd).st_size
        torch_dtype = getattr(torch, dtype)
        if size == 0:
            return torch.empty(shape, dtype=torch_dtype)
        # Private and not pre-faulted: reads map the file's pages as they come (64 MiB mapped and read in
        # 4 ms here); MAP_POPULATE would copy every page of a private writable mapping up front (30 ms).
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch_dtype).view(shape)  # the tensor keeps the mapping
