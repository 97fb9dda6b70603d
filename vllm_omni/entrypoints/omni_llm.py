"""``OmniLLM``: offline inference through an omni pipeline of stages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_omni.config.stage import OmniStageConfig, load_stage_configs
from vllm_omni.core.outputs import OmniRequestOutput
from vllm_omni.core.stage_runner import ARStageRunner, make_stage_runner


class OmniLLM:
    """Offline pipeline of stages, each served by its own engine.

    One request per prompt flows through the stages; ``generate`` returns an :class:`OmniRequestOutput`
    per prompt, in order. Stages run one after another, each on the whole batch. Hand-offs in this
    release: text (an ``ar`` stage's generated text is the next stage's prompt), so a pipeline is any
    number of ``ar`` stages optionally followed by one ``dit`` stage.
    """

    def __init__(self, stages: Sequence[OmniStageConfig] | str | Path) -> None:
        """``stages``: the stage configs, or the path of a YAML pipeline file (``load_stage_configs``)."""
        self.stages = load_stage_configs(stages) if isinstance(stages, (str, Path)) else list(stages)
        _check_pipeline(self.stages)
        self.runners = []
        try:
            for stage in self.stages:
                self.runners.append(make_stage_runner(stage))
        except Exception:
            self.close()
            raise

    def generate(
        self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True
    ) -> list[OmniRequestOutput]:
        """Run ``prompts`` (one prompt or a list; a prompt is a string or a dict) through the pipeline.

        ``sampling_params``: a list with one entry per stage (for a pipeline of several stages), or a single
        entry for every stage; an entry is the stage's params object (``vllm.SamplingParams`` for ``ar``,
        ``DiffusionSamplingParams`` for ``dit``), a dict of its fields, or a list with one per prompt.
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        inputs, per_stage = prompts, []
        for index, runner in enumerate(self.runners):
            entry = _stage_entry(sampling_params, len(self.runners), index)
            params = [runner.params(e) for e in _per_prompt(entry, len(prompts))]
            outputs = runner.run(inputs, params, use_tqdm)
            per_stage.append(outputs)
            if isinstance(runner, ARStageRunner):
                inputs = [{"prompt": runner.text(output)} for output in outputs]
        return [self._request_output(i, prompt, per_stage) for i, prompt in enumerate(prompts)]

    def _request_output(self, index: int, prompt: Any, per_stage: list[list[Any]]) -> OmniRequestOutput:
        # The first stage's request id names the request (unique across calls in both engine kinds).
        result = OmniRequestOutput(request_id=per_stage[0][index].request_id, prompt=prompt)
        for stage, runner, outputs in zip(self.stages, self.runners, per_stage, strict=True):
            output = outputs[index]
            result.stage_outputs[stage.stage_id] = output
            if isinstance(runner, ARStageRunner):
                if stage.final_output:
                    result.text = runner.text(output)
            else:
                result.error = f"stage {stage.stage_id}: {output.error}" if output.error else None
                if stage.final_output:
                    result.images, result.latents = output.images, output.latents
        return result

    def close(self) -> None:
        """Stop every stage's engine."""
        for runner in self.runners:
            runner.close()


def _check_pipeline(stages: list[OmniStageConfig]) -> None:
    if not stages:
        raise ValueError("OmniLLM needs at least one stage")
    for position, stage in enumerate(stages):
        if stage.stage_id != position:
            raise ValueError(
                f"stage {stage.stage_id}: stage_id must equal its position in the list ({position})"
            )
        if position == 0:
            continue
        before = stages[position - 1]
        if (
            before.engine_type != "ar"
            or stage.input_modalities != ["text"]
            or "text" not in before.output_modalities
        ):
            raise NotImplementedError(
                f"stage {stage.stage_id}: only text hand-offs from an 'ar' stage are supported so far "
                f"(stage {before.stage_id} is {before.engine_type!r} with output {before.output_modalities}, "
                f"stage {stage.stage_id} takes {stage.input_modalities})"
            )


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
