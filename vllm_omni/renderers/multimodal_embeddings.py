"""Named raw embeddings in chat messages: the ``multimodal_embeddings`` content part.

Mirrors ``vllm/renderers/chat_utils.py``. A user message may hold, among its text parts::

    {"type": "multimodal_embeddings",
     "multimodal_embeddings": {"audio": "<base64>", "vision": ["<base64>", "<base64>"]}}

Each base64 string is one item: a ``.npy`` file (``numpy.save``; preferred, no pickle) or a
``torch.save`` file (read with ``weights_only=True``, sparse tensors checked and densified within
``VLLM_MAX_EMBED_DECODE_BYTES``). A 1-D item ``(width,)`` is one position, a 2-D item ``(n, width)`` n
positions. The part becomes its placeholders, ``<|audio|><|vision|><|vision|>``, inline where it sits
among the text parts, whatever ``--interleave-mm-strings`` says (like vLLM's ``prompt_embeds`` part), so
text positions are kept; the items go to the model's processor as ``multi_modal_data[name]``.

Two wraps of ``chat_utils`` do it:

- ``_parse_chat_message_content_part``: decodes the part's items, adds them to the request's item tracker
  (which counts them per modality) tagged as ``NamedEmbedding``, and returns the placeholder text.
- ``_resolve_items``: hands the tagged items over as ``mm_data[name]`` and everything else to vLLM. It
  separates by tag, not by name: a model modality may be called ``audio`` like vLLM's built-in one, which
  vLLM would otherwise resolve as audio clips (and a name vLLM does not know it would drop).

Widths, dtypes and finite values are checked later by the model's parser
(``vllm_omni.multimodal.named_embeddings``); its ``ValueError`` is a 400 as well.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError
from vllm.utils.sparse_utils import check_sparse_tensor_invariants_threadsafe, safe_to_dense

from vllm_omni.config.multimodal_qwen3 import modalities_from_config

PART_TYPE = "multimodal_embeddings"
"""``type`` of the content part, and the key holding its ``{modality name: base64 | [base64, ...]}``."""
NUMPY_MAGIC = b"\x93NUMPY"
MAX_REASON_CHARS = 200
"""How much of numpy's or torch's own reason is repeated back (it is built from the caller's bytes)."""


@dataclass(frozen=True)
class NamedEmbedding:
    """One item of a ``multimodal_embeddings`` part, tagged so ``_resolve_items`` tells it apart."""

    tensor: torch.Tensor


def _error(message: str) -> VLLMValidationError:
    return VLLMValidationError(message, parameter=PART_TYPE)


def _reason(error: Exception) -> str:
    reason = str(error).strip() or type(error).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."


def decode_embedding(data: Any, where: str) -> torch.Tensor:
    """The tensor in ``data`` (base64 of a ``.npy`` or ``torch.save`` file); ``where`` names the field.

    Raises ``VLLMValidationError`` (HTTP 400) saying what is wrong and what is accepted.
    """
    if not isinstance(data, str):
        raise _error(f"{where} must be a base64 string (of a .npy or torch.save file), got "
                     f"{type(data).__name__}")  # fmt: skip
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _error(f"{where} is not valid base64 ({_reason(error)}); send base64 of a .npy or "
                     f"torch.save file") from None  # fmt: skip
    if payload.startswith(NUMPY_MAGIC):
        return _load_npy(payload, where)
    return _load_torch(payload, where)


def _load_npy(payload: bytes, where: str) -> torch.Tensor:
    buffer = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
            np.lib.format.read_array_header_2_0)  # fmt: skip
        shape, _, dtype = read_header(buffer)
        # np.load allocates what the header declares before reading: refuse more than the payload holds.
        declared, held = math.prod(shape) * dtype.itemsize, len(payload) - buffer.tell()
        if declared > held:
            raise ValueError(f"header declares {shape} {dtype} ({declared} bytes); data holds {held}")
        buffer.seek(0)
        return torch.from_numpy(np.load(buffer, allow_pickle=False))
    except (ValueError, TypeError, EOFError) as error:
        raise _error(f"{where} is not a readable .npy array of floats: {_reason(error)}") from None


def _load_torch(payload: bytes, where: str) -> torch.Tensor:
    with check_sparse_tensor_invariants_threadsafe():
        try:
            loaded = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        except (torch.OutOfMemoryError, MemoryError):
            raise  # the server's condition, not the caller's
        except Exception as error:  # torch has no single "not a tensor file" error type
            raise _error(f"{where} is neither a .npy file nor a torch.save file of one tensor: "
                         f"{_reason(error)}") from None  # fmt: skip
        if not isinstance(loaded, torch.Tensor):
            raise _error(f"{where} holds a {type(loaded).__name__}; allowed: one tensor (.npy or torch.save)")
        return safe_to_dense(loaded, parameter=where)


def _payload(part: dict[str, Any], names: list[str]) -> list[tuple[str, list[Any]]]:
    """``[(modality name, [base64, ...]), ...]`` of a part, its shape and names checked."""
    payload = part.get(PART_TYPE)
    allowed = ", ".join(names)
    if not isinstance(payload, dict) or not payload:
        raise _error(f"{PART_TYPE} must be a non-empty object: modality name ({allowed}) -> base64 "
                     f"tensor or list of them")  # fmt: skip
    groups = []
    for name, value in payload.items():
        if name not in names:
            raise _error(f"{PART_TYPE}: unknown modality {name!r}; this model takes {allowed}")
        group = [value] if isinstance(value, str) else value
        if not isinstance(group, list) or not group:
            raise _error(f"{PART_TYPE}[{name!r}] must be a base64 string or a non-empty list of them")
        groups.append((name, group))
    return groups


def _modality_names(model_config) -> list[str]:
    try:
        return sorted(modalities_from_config(model_config.hf_config))
    except ValueError:
        raise _error(f"{PART_TYPE} content parts need a model with named embedding modalities (such as "
                     f"MultimodalQwen3ForCausalLM); {model_config.model} has none") from None  # fmt: skip


async def _decode_later(data: Any, where: str) -> tuple[NamedEmbedding, None]:
    # The async tracker awaits items when it resolves them; decoding off the event loop keeps the
    # server responsive for large payloads. The second slot is the tracker's (unused) item uuid.
    return NamedEmbedding(await asyncio.to_thread(decode_embedding, data, where)), None


def add_part_items(part: dict[str, Any], tracker, is_async: bool) -> str:
    """Add a part's items to the request's ``tracker``; the part's placeholder text, in item order."""
    texts = []
    for name, group in _payload(part, _modality_names(tracker.model_config)):
        for index, data in enumerate(group):
            where = f"{PART_TYPE}[{name!r}][{index}]"
            if is_async:
                item = partial(_decode_later, data, where)
            else:
                item = (NamedEmbedding(decode_embedding(data, where)), None)
            texts.append(tracker.add(name, item))  # checks the per-prompt count
    return "".join(texts)


def patch_content_part_parser(module: ModuleType) -> None:
    """Wrap ``chat_utils._parse_chat_message_content_part`` to accept ``multimodal_embeddings`` parts."""
    stock = module._parse_chat_message_content_part
    async_tracker_cls = module.AsyncMultiModalItemTracker

    def _parse_chat_message_content_part(part, mm_parser, *, wrap_dicts, interleave_strings):
        if not (isinstance(part, dict) and part.get("type") == PART_TYPE):
            return stock(part, mm_parser, wrap_dicts=wrap_dicts, interleave_strings=interleave_strings)
        tracker = mm_parser._tracker  # the parser's only handle on the request's items
        text = add_part_items(part, tracker, is_async=isinstance(tracker, async_tracker_cls))
        return {"type": "text", "text": text} if wrap_dicts else text

    module._parse_chat_message_content_part = _parse_chat_message_content_part


def split_items(items_by_modality: dict[str, list]) -> tuple[dict[str, list], dict[str, list]]:
    """``(vLLM's items, ours)`` by tag; a modality may not mix both kinds in one request."""
    stock, named = {}, {}
    for modality, items in items_by_modality.items():
        tagged = [isinstance(item, tuple) and bool(item) and isinstance(item[0], NamedEmbedding)
                  for item in items]  # fmt: skip
        if items and all(tagged):
            named[modality] = items
        elif not any(tagged):
            stock[modality] = items
        else:
            raise _error(f"{modality!r} items come both from {PART_TYPE} parts and from other content "
                         f"parts; send all {modality!r} items as {PART_TYPE}")  # fmt: skip
    return stock, named


def patch_resolve_items(module: ModuleType) -> None:
    """Wrap ``chat_utils._resolve_items`` to hand tagged items to the model as ``mm_data[name]``."""
    stock = module._resolve_items

    def _resolve_items(items_by_modality, mm_processor, modality_order):
        stock_items, named = split_items(items_by_modality)
        if not named:
            return stock(items_by_modality, mm_processor, modality_order)
        mm_data, mm_uuids = stock(stock_items, mm_processor, modality_order)
        for modality, items in named.items():
            mm_data[modality] = [data.tensor for data, _ in items]
            mm_uuids[modality] = [uuid for _, uuid in items]
        return mm_data, mm_uuids

    module._resolve_items = _resolve_items
