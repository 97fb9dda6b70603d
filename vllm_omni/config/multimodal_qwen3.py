"""The modalities of a multimodal Qwen3 checkpoint, as its ``config.json`` lists them.

A multimodal Qwen3 folder is a Qwen3 folder whose ``config.json`` has
``"architectures": ["MultimodalQwen3ForCausalLM"]`` and a ``"multimodal_projectors"`` entry::

    "multimodal_projectors": {
    "audio": {"input_width": 768, "hidden_size": 1024, "placeholder": "<|audio|>", "placeholder_id": 151669},
    "vision": {"input_width": 512, "hidden_size": 1024, "placeholder": "<|vision|>", "placeholder_id": 151670}
    }

Each modality has its own 2-layer MLP projector (``input_width -> hidden_size -> LM hidden size``) stored
as ``multi_modal_projectors.<name>.linear_{1,2}.{weight,bias}``, and its own placeholder token, added to
the tokenizer as a special token.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

CONFIG_KEY = "multimodal_projectors"
ARCHITECTURE = "MultimodalQwen3ForCausalLM"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# vLLM hashes an item as keyword ``<modality>=item`` beside these keywords, reads ``multimodal_embeddings`` as
# the container of all modalities, and treats names ending in ``_embeds`` as its own embedding inputs.
_RESERVED = ("model_id", "mm_processor_kwargs", "media_io_kwargs", "multimodal_embeddings")


@dataclass(frozen=True)
class ModalitySpec:
    """One named modality of a multimodal Qwen3 checkpoint."""

    input_width: int
    """Width of the raw embedding vectors users pass for this modality."""
    hidden_size: int
    """Width of the projector's hidden layer."""
    placeholder: str
    """Prompt text standing for one item of this modality (a special token of the tokenizer)."""
    placeholder_id: int
    """Token id of ``placeholder``."""


def placeholder_text(name: str) -> str:
    """The default placeholder of modality ``name``: ``<|name|>``."""
    return f"<|{name}|>"


def check_modality_name(name: str) -> str:
    """``name`` if it is a valid modality name (a letter, then letters, digits or ``_``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"modality name {name!r} is not allowed: use a letter followed by letters, digits or '_'"
        )
    if name in _RESERVED or "_embeds" in name:
        raise ValueError(f"modality name {name!r} is reserved by vLLM: avoid {_RESERVED} and '_embeds'")
    return name


def modalities_from_config(hf_config: Any) -> dict[str, ModalitySpec]:
    """The modalities listed by a checkpoint's config (a transformers config or a dict), validated."""
    raw = hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict) else getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"config.json of a {ARCHITECTURE} checkpoint needs a non-empty {CONFIG_KEY!r} dict")
    specs = {}
    for name, entry in raw.items():
        check_modality_name(name)
        try:
            specs[name] = ModalitySpec(**entry)
        except TypeError as error:
            raise ValueError(f"{CONFIG_KEY}.{name}: {error}") from None
        for key, low in (("input_width", 1), ("hidden_size", 1), ("placeholder_id", 0)):
            value = getattr(specs[name], key)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{CONFIG_KEY}.{name}.{key} must be an integer >= {low}, got {value!r}")
    return specs


def modalities_to_config(specs: dict[str, ModalitySpec]) -> dict[str, dict[str, Any]]:
    """The ``config.json`` form of ``specs``."""
    return {name: asdict(spec) for name, spec in specs.items()}
