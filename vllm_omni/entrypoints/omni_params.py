"""The ``sampling_params`` argument of ``OmniLLM`` / ``AsyncOmniLLM``: per stage, per prompt."""

from __future__ import annotations

from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.core.stage_engine import stage_params


def pipeline_params(
    stages: list[OmniStageConfig], sampling_params: Any, num_prompts: int, streaming: bool
) -> list[list[Any]]:
    """Each prompt's params object per stage.

    ``sampling_params``: a list with one entry per stage (for a pipeline of several stages), or a single
    entry for every stage; an entry is the stage's params object, a dict of its fields, or a list with one
    per prompt. Without ``streaming``, AR stages report only their final output (as ``vllm.LLM`` does),
    and so do AR stages that return hidden states; with it the others keep their ``output_kind``
    (CUMULATIVE by default: one report per token), except DELTA, which a pipeline cannot hand on (the
    next stage needs the whole text).
    """
    from vllm.sampling_params import RequestOutputKind

    per_stage = []
    for index, stage in enumerate(stages):
        entries = _per_prompt(_stage_entry(sampling_params, len(stages), index), num_prompts)
        objects = [stage_params(stage, entry) for entry in entries]
        for p in objects if stage.engine_type == "ar" else ():
            if not streaming or "hidden_states" in stage.output_modalities:  # not the tensor every token
                p.output_kind = RequestOutputKind.FINAL_ONLY
            elif p.output_kind == RequestOutputKind.DELTA:
                raise ValueError(
                    f"stage {stage.stage_id}: output_kind DELTA is not supported in a pipeline; "
                    "use CUMULATIVE (the default) or FINAL_ONLY"
                )
        per_stage.append(objects)
    return [list(p) for p in zip(*per_stage, strict=True)]


def _stage_entry(sampling_params: Any, num_stages: int, index: int) -> Any:
    if isinstance(sampling_params, (list, tuple)) and len(sampling_params) == num_stages and num_stages > 1:
        return sampling_params[index]
    return sampling_params


def _per_prompt(entry: Any, num_prompts: int) -> list[Any]:
    if isinstance(entry, (list, tuple)):
        if len(entry) != num_prompts:
            raise ValueError(f"sampling_params has {len(entry)} entries for {num_prompts} prompts")
        return list(entry)
    return [entry] * num_prompts
