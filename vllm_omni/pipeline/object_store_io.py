"""Stage messages between Ray actors: large tensors travel in Ray's object store instead of /dev/shm.

A message travels as ``(bytes, refs)``: the pickle, and the ``ObjectRef`` objects it names by position
(pickle's persistent ids). Ray carries the refs itself, in the actor call or in its result, so it counts
them; a ref pickled into the bytes would be serialized out of band and its object never freed. A CPU
tensor of at least ``threshold`` bytes is ``ray.put`` once, as its raw bytes; loading it on the same node
maps the store's memory (no copy), on another node Ray moves the object there once. With ``keep`` (the
manager) a loaded tensor remembers its ref, so passing it on to the next stage sends the ref, not the
bytes. Ray frees an object with its last ref: there is nothing to release or sweep. An object lives as
long as the process that put it (a stage replica): a replica that dies takes its unread outputs along.
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import ray
import torch

from vllm_omni.pipeline.stage_io import SHM_THRESHOLD_BYTES

_REF_ATTR = "_omni_object_ref"  # on a tensor the manager loaded: its object's ref


@dataclass(frozen=True)
class ObjectStoreCodec:
    """Messages as ``(bytes, refs)``, large tensors in Ray's object store (Ray's launcher's codec)."""

    threshold: int = SHM_THRESHOLD_BYTES
    """Tensors of at least this many bytes travel in the object store."""

    def dumps(self, message: Any, forwarded: list | None = None) -> tuple[bytes, list[ray.ObjectRef]]:
        buffer, refs = io.BytesIO(), []
        _Pickler(buffer, self.threshold, refs).dump(message)
        return buffer.getvalue(), refs

    def loads(self, data: tuple[bytes, list[ray.ObjectRef]], keep: list | None = None) -> Any:
        return _Unpickler(data, tag=keep is not None).load()

    def release(self, kept: list) -> None:
        """Nothing to do: Ray frees an object with its last ref."""

    def sweep(self) -> None:
        """Nothing to do: objects go with the process that put them."""


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, threshold: int, refs: list[ray.ObjectRef]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.threshold, self.refs = threshold, refs

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, ray.ObjectRef):
            self.refs.append(obj)
            return len(self.refs) - 1
        return None

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            return NotImplemented
        ref = obj.__dict__.get(_REF_ATTR)
        if ref is None and obj.numel() * obj.element_size() >= self.threshold:
            ref = ray.put(obj.detach().contiguous().view(-1).view(torch.uint8).numpy())
        if ref is None:
            return NotImplemented
        return _from_store, (ref, tuple(obj.shape), str(obj.dtype).removeprefix("torch."))


class _Unpickler(pickle.Unpickler):
    """Resolves the message's refs; with ``tag``, loaded tensors remember theirs."""

    def __init__(self, data: tuple[bytes, list[ray.ObjectRef]], tag: bool) -> None:
        super().__init__(io.BytesIO(data[0]))
        self.refs, self.tag = data[1], tag

    def persistent_load(self, pid: int) -> ray.ObjectRef:
        return self.refs[pid]

    def find_class(self, module: str, name: str) -> Any:
        if self.tag and module == __name__ and name == "_from_store":
            return _from_store_tagged
        return super().find_class(module, name)


def _from_store(ref: ray.ObjectRef, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The object's bytes as the tensor: on the object's node, a read-only view of the store's memory."""
    with warnings.catch_warnings():  # the store's memory is read-only, which torch cannot mark
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(ray.get(ref))
    return data.view(getattr(torch, dtype)).view(shape)


def _from_store_tagged(ref: ray.ObjectRef, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    tensor = _from_store(ref, shape, dtype)
    tensor.__dict__[_REF_ATTR] = ref
    return tensor
