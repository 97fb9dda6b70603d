"""``OmniLLM``: offline inference through an omni pipeline of stages."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from typing import Any

from tqdm import tqdm

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.core.outputs import OmniRequestOutput
from vllm_omni.diffusion.request import DiffusionOutput, DiffusionSamplingParams
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine


class OmniLLM:
    """Offline pipeline of stages, each served by its own engine.

    One request per prompt flows through the stages; ``generate`` returns an :class:`OmniRequestOutput`
    per prompt, in order. This release serves a single ``dit`` stage (in this process).
    """

    def __init__(self, stages: Sequence[OmniStageConfig]) -> None:
        stages = list(stages)
        if len(stages) != 1 or stages[0].engine_type != "dit":
            raise NotImplementedError(
                "OmniLLM serves one 'dit' stage for now; multi-stage pipelines are next"
            )
        self.stages = stages
        stage = stages[0]
        self.engine = create_diffusion_engine(stage.model_path, stage.dit_config)
        self._ids = count()

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        use_tqdm: bool = True,
    ) -> list[OmniRequestOutput]:
        """Run ``prompts`` (one prompt or a list; a prompt is a string or a dict) through the pipeline.

        ``sampling_params``: one entry per stage (a list), or a single entry used by every stage; an entry is
        the stage's params object (``DiffusionSamplingParams`` for ``dit``), a dict of its fields, or a list
        with one per prompt.
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(_stage_entry(sampling_params, len(self.stages), 0), len(prompts))
        ids = [str(next(self._ids)) for _ in prompts]
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            self.engine.abort_request(added)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        results = self._run(set(ids), use_tqdm)
        return [self._request_output(i, prompt, results[i]) for i, prompt in zip(ids, prompts, strict=True)]

    def _run(self, ids: set[str], use_tqdm: bool) -> dict[str, DiffusionOutput]:
        results: dict[str, DiffusionOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for output in self.engine.step():
                    if output.request_id in ids:
                        results[output.request_id] = output
                        bar.update(1)
        return results

    def _request_output(self, request_id: str, prompt: Any, output: DiffusionOutput) -> OmniRequestOutput:
        stage_id = self.stages[0].stage_id
        error = f"stage {stage_id}: {output.error}" if output.error else None
        return OmniRequestOutput(
            request_id=request_id,
            prompt=prompt,
            images=output.images,
            latents=output.latents,
            stage_outputs={stage_id: output},
            error=error,
        )


def _stage_entry(sampling_params: Any, num_stages: int, index: int) -> Any:
    if isinstance(sampling_params, (list, tuple)) and len(sampling_params) == num_stages and num_stages > 1:
        return sampling_params[index]
    return sampling_params


def _per_prompt(entry: Any, num_prompts: int) -> list[DiffusionSamplingParams]:
    if isinstance(entry, (list, tuple)):
        if len(entry) != num_prompts:
            raise ValueError(f"sampling_params has {len(entry)} entries for {num_prompts} prompts")
        return [_as_params(e) for e in entry]
    return [_as_params(entry)] * num_prompts


def _as_params(entry: Any) -> DiffusionSamplingParams:
    if entry is None:
        return DiffusionSamplingParams()
    if isinstance(entry, dict):
        return DiffusionSamplingParams.from_dict(entry)
    if isinstance(entry, DiffusionSamplingParams):
        return entry
    raise ValueError(f"a DiT stage takes DiffusionSamplingParams or a dict, got {type(entry).__name__}")
