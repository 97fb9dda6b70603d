"""Native DiT model families, picked by the ``_class_name`` in a folder's ``model_index.json``."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_omni.diffusion.models.base import DenoiseState, DiTFamily
from vllm_omni.diffusion.models.sd3 import SD3Family
from vllm_omni.diffusion.models.z_image import ZImageFamily

FAMILIES: dict[str, type[DiTFamily]] = {cls.name: cls for cls in (SD3Family, ZImageFamily)}

__all__ = ["FAMILIES", "DenoiseState", "DiTFamily", "pipeline_class_name", "resolve_family"]


def pipeline_class_name(model_path: str) -> str:
    """The diffusers pipeline class a diffusers-format folder declares."""
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{model_path!r} is not a diffusers folder (no model_index.json)")
    return json.loads(index.read_text())["_class_name"]


def resolve_family(model_path: str, model_type: str = "auto") -> type[DiTFamily]:
    """The family serving ``model_path``: ``model_type`` when given, else the one its pipeline class names."""
    if model_type != "auto":
        if model_type not in FAMILIES:
            allowed = ["auto", *sorted(FAMILIES)]
            raise ValueError(f"DiTConfig.model_type must be one of {allowed}, got {model_type!r}")
        return FAMILIES[model_type]
    class_name = pipeline_class_name(model_path)
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    raise ValueError(
        f"{class_name} (from {model_path}/model_index.json) has no native runner; native families: "
        f"{sorted(FAMILIES)}. Set DiTConfig.use_diffusers=True to run the diffusers pipeline as is."
    )
