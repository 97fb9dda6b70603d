"""The pipeline ``OmniLLM(...)``, ``AsyncOmniLLM(...)`` and ``vllm serve MODEL --omni`` are given: stage
configs, a YAML pipeline file, or a model whose pipeline it implies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_omni.config.stage import (
    OmniStageConfig,
    create_ar_stage_config,
    create_dit_stage_config,
    load_pipeline_file,
)
from vllm_omni.transformers_utils.model_resolution import (
    DIFFUSERS_INDEX,
    ModelNotFoundError,
    is_local,
    model_file,
    model_folder,
)


def pipeline_of(
    given: Sequence[OmniStageConfig] | str | Path, revision: str | None = None
) -> tuple[list[OmniStageConfig], str | None]:
    """The stages and the launcher named (a YAML file's ``launcher``, else None) of ``given``: stage
    configs, the path of a YAML pipeline file, or a model (``stages_for_model``)."""
    if not isinstance(given, (str, Path)):
        return list(given), None
    if is_pipeline_file(given):
        return load_pipeline_file(given)
    return stages_for_model(str(given), revision), None


def is_pipeline_file(given: str | Path | None) -> bool:
    """Whether ``given`` names a YAML pipeline file (rather than a model)."""
    return given is not None and Path(given).suffix in (".yaml", ".yml")


def stages_for_model(model: str, revision: str | None = None, **engine_args: Any) -> list[OmniStageConfig]:
    """``model``'s pipeline, for a local folder or a hub id (``revision`` applies to hub ids): a diffusers
    pipeline (``model_index.json``): one dit stage; a Qwen2.5-Omni (thinker, talker and token2wav in its
    ``config.json``): thinker -> talker -> code2wav; any other vLLM model: one ar stage.

    ``engine_args``: vLLM engine arguments for the model as a user means them (``vllm serve``'s engine
    flags): the ar stage's, or the Qwen2.5-Omni thinker's (``qwen2_5_omni_stages`` says what its talker
    takes of them); a diffusers pipeline has no vLLM engine."""
    from vllm_omni.pipeline.qwen2_5_omni_stages import is_qwen2_5_omni, qwen2_5_omni_stages

    if model_file(model, DIFFUSERS_INDEX, revision) is not None:
        return [create_dit_stage_config(0, model, revision=revision)]
    config = _config_file(model, revision)
    if config is not None and is_qwen2_5_omni(config):
        return qwen2_5_omni_stages(str(model_folder(model, revision)), **engine_args)
    if config is not None or not is_local(model):  # a vLLM model folder, or a hub id vLLM loads (or names)
        revised = {"revision": revision} if revision is not None else {}
        return [create_ar_stage_config(0, model, **revised, **engine_args)]
    raise ValueError(f"MODEL {model!r}: a folder with model_index.json (diffusers) or config.json (vLLM)")


def _config_file(model: str, revision: str | None) -> Path | None:
    """The model's ``config.json``; None when it has none, or when a hub id cannot be had here (its engine
    then says why, naming the id)."""
    try:
        return model_file(model, "config.json", revision)
    except ModelNotFoundError:
        return None
