"""The ``sampling_params`` argument of ``OmniLLM`` / ``AsyncOmniLLM``: per stage, per prompt."""

from __future__ import annotations

from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.kinds import get_stage_kind
from vllm_omni.pipeline.kinds.base import StageRoute
from vllm_omni.pipeline.stage_input import reads_all_positions


def pipeline_params(
    stages: list[OmniStageConfig],
    sampling_params: Any,
    num_prompts: int,
    streaming: bool,
    modalities: list[str] | list[list[str]] | None = None,
) -> list[list[Any]]:
    """Each prompt's params object per stage of its route.

    ``sampling_params``: a list with one entry per stage (for a pipeline of several stages), or a single
    entry for every stage; an entry is the stage's params object, a dict of its fields, or a list with one
    per prompt. Each stage's kind builds its params object and adjusts it to how the pipeline runs
    (``streaming``: whether snapshots are wanted while a request runs; e.g. an AR stage then streams its
    tokens only when it is a final stage without hidden states).
    ``modalities``: the outputs the requests want (``route_end``), for all of them or a list per prompt;
    a request's route stops at the last stage that makes one of them.
    """
    per_prompt = _listed_per_prompt(modalities)
    wanted = _per_prompt(modalities, num_prompts, "modalities") if per_prompt else [modalities] * num_prompts
    entries = [
        _per_prompt(_stage_entry(sampling_params, len(stages), i), num_prompts) for i in range(len(stages))
    ]
    return [
        _request_params(stages, [stage[p] for stage in entries], streaming, wanted[p])
        for p in range(num_prompts)
    ]


def _request_params(
    stages: list[OmniStageConfig], entries: list[Any], streaming: bool, modalities: list[str] | None
) -> list[Any]:
    """One request's params per stage of its route (``entries``: its entry per stage)."""
    end = route_end(stages, modalities)
    route = stages[: end + 1]
    prepared: dict[int, Any] = {}
    for index in reversed(range(len(route))):  # a stage's route depends on its readers' params
        stage, kind = route[index], get_stage_kind(route[index].engine_type)
        params = kind.make_params(stage, _with_defaults(stage, entries[index]))
        cut_short = index == end < len(stages) - 1
        prepared[index] = kind.prepare_params(
            stage, params, _route(route, stage, streaming, cut_short, prepared)
        )
    return [prepared[index] for index in range(len(route))]


def _route(
    route: list[OmniStageConfig],
    stage: OmniStageConfig,
    streaming: bool,
    cut_short: bool,
    prepared: dict[int, Any],
) -> StageRoute:
    """How a request whose route is ``route`` uses ``stage`` (``prepared``: its later stages' params)."""
    readers = [s for s in route if s.source_stage == stage.stage_id]
    streamed_on = [
        reader.final_output
        and get_stage_kind(reader.engine_type).takes_input_while_made(prepared[reader.stage_id])
        for reader in readers
    ]
    return StageRoute(
        streaming=streaming,
        handed_on=bool(readers),
        cut_short=cut_short,
        all_positions=any(reads_all_positions(route, reader) for reader in readers),
        streamed_on=streaming and any(streamed_on),
    )


def route_end(stages: list[OmniStageConfig], modalities: list[str] | None) -> int:
    """The index of the last stage a request wanting ``modalities`` runs: the last final stage making one
    of them (``None``: every stage). A Qwen2.5-Omni request wanting ``["text"]`` ends at the thinker, one
    wanting ``["audio"]`` runs the talker and code2wav too; in AR -> AR, ``["text"]`` is the second's."""
    if modalities is None:
        return len(stages) - 1
    makers = {m: i for i, s in enumerate(stages) if s.final_output for m in s.output_modalities}
    unknown = [m for m in modalities if m not in makers]
    if not modalities or unknown:
        raise ValueError(f"modalities must be a non-empty list of {sorted(makers)}, got {modalities!r}")
    return max(makers[m] for m in modalities)


def _stage_entry(sampling_params: Any, num_stages: int, index: int) -> Any:
    if isinstance(sampling_params, (list, tuple)) and len(sampling_params) == num_stages and num_stages > 1:
        return sampling_params[index]
    return sampling_params


def _with_defaults(stage: OmniStageConfig, entry: Any) -> Any:
    """A request's entry on top of its stage's ``default_params`` (a params object stands alone)."""
    if stage.default_params is None or not (entry is None or isinstance(entry, dict)):
        return entry
    return {**stage.default_params, **(entry or {})}


def _listed_per_prompt(modalities: Any) -> bool:
    """Whether ``modalities`` is a list per prompt (of lists), not one list for all."""
    return (
        isinstance(modalities, (list, tuple))
        and bool(modalities)
        and isinstance(modalities[0], (list, tuple))
    )


def _per_prompt(entry: Any, num_prompts: int, name: str = "sampling_params") -> list[Any]:
    if isinstance(entry, (list, tuple)):
        if len(entry) != num_prompts:
            raise ValueError(f"{name} has {len(entry)} entries for {num_prompts} prompts")
        return list(entry)
    return [entry] * num_prompts
