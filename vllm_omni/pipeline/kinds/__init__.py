"""The registry of stage kinds: the name in ``OmniStageConfig.engine_type`` -> the :class:`StageKind`.

Kinds are registered by dotted path (``"module:attribute"``) and imported on first use, the way vLLM
registers models lazily, so naming a kind costs nothing and a stage process imports only its own kind.
Adding a kind is one module (a :class:`~vllm_omni.pipeline.kinds.base.StageKind` and its engine) and one
``register_stage_kind`` call; docs/STRUCTURE.md walks through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_omni.pipeline.kinds.base import StageKind

_KINDS: dict[str, str] = {
    "ar": "vllm_omni.pipeline.kinds.ar:AR_STAGE",
    "dit": "vllm_omni.pipeline.kinds.dit:DIT_STAGE",
    "code2wav": "vllm_omni.pipeline.kinds.code2wav:CODE2WAV_STAGE",
}


def register_stage_kind(name: str, target: str) -> None:
    """Register the kind ``name`` as ``target``, ``"package.module:attribute"`` naming a ``StageKind``
    instance in an importable module (stage processes import it by that path)."""
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"stage kind target must look like 'package.module:attribute', got {target!r}")
    _KINDS[name] = target


def stage_kind_names() -> list[str]:
    """Names of the registered stage kinds."""
    return list(_KINDS)


def get_stage_kind(name: str) -> StageKind:
    """The kind registered as ``name`` (ValueError listing the registered names otherwise)."""
    if name not in _KINDS:
        raise ValueError(f"engine_type must be one of {stage_kind_names()}, got {name!r}")
    module, _, attribute = _KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
