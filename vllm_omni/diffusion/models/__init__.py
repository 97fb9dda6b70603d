"""Native DiT model families, picked by the ``_class_name`` in a folder's ``model_index.json``."""

from __future__ import annotations

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.models.base import DenoiseState, DiTFamily
from vllm_omni.diffusion.models.sd3 import SD3Family
from vllm_omni.diffusion.models.z_image import ZImageFamily

FAMILIES: dict[str, type[DiTFamily]] = {cls.name: cls for cls in (SD3Family, ZImageFamily)}

__all__ = ["FAMILIES", "DenoiseState", "DiTFamily", "native_family", "resolve_family", "select_executor"]


def native_family(class_name: str) -> type[DiTFamily] | None:
    """The native family serving diffusers pipeline class ``class_name``; None when none does."""
    return next((family for family in FAMILIES.values() if class_name in family.pipeline_classes), None)


def select_executor(class_name: str, config: DiTConfig) -> str:
    """``native`` or ``diffusers``: what runs pipeline class ``class_name`` under ``config.executor``
    (``auto``: native for the native families' pipelines or a ``model_type`` given, diffusers otherwise)."""
    native = config.model_type != "auto" or native_family(class_name) is not None
    if config.executor == "auto":
        return "native" if native else "diffusers"
    if config.executor == "native" and not native:
        raise ValueError(_no_native_family(class_name, "DiTConfig.executor='native'"))
    return config.executor


def resolve_family(class_name: str, model_type: str = "auto") -> type[DiTFamily]:
    """The family serving pipeline class ``class_name``: ``model_type`` when given, else the one that class
    names."""
    if model_type != "auto":
        if model_type not in FAMILIES:
            allowed = ["auto", *sorted(FAMILIES)]
            raise ValueError(f"DiTConfig.model_type must be one of {allowed}, got {model_type!r}")
        return FAMILIES[model_type]
    family = native_family(class_name)
    if family is None:
        raise ValueError(_no_native_family(class_name, "the native engine"))
    return family


def _no_native_family(class_name: str, what: str) -> str:
    pipelines = sorted(name for family in FAMILIES.values() for name in family.pipeline_classes)
    return (
        f"{what}: {class_name} has no native runner; native families: {sorted(FAMILIES)} (pipelines "
        f"{pipelines}). DiTConfig.executor 'auto' (the default) or 'diffusers' runs it through diffusers."
    )
