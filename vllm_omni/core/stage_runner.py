"""Stage runners: one engine per stage, running a batch of the stage's requests to completion.

Each runner turns the stage's per-prompt sampling-parameter entries into its engine's params, runs a batch
of prompts and returns one output per prompt, in order; an AR runner also gives an output's text (what
the next stage receives). ``OmniLLM`` drives them stage after stage in this process; a StageManager can
put the same interface in front of an engine in its own process.
"""

from __future__ import annotations

from itertools import count
from typing import Any

from tqdm import tqdm

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.diffusion.request import DiffusionOutput, DiffusionSamplingParams
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine


class ARStageRunner:
    """An autoregressive stage: a ``vllm.LLM`` (its EngineCore runs in its own process)."""

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm import LLM

        self.config = config
        self.llm = LLM(model=config.model_path, **config.engine_args)

    def params(self, entry: Any) -> Any:
        """``vllm.SamplingParams`` of one entry (``None``, a dict of its fields, or the object)."""
        from vllm import SamplingParams

        if entry is None:
            return SamplingParams()
        if isinstance(entry, dict):
            try:
                return SamplingParams(**entry)
            except TypeError as error:
                raise ValueError(f"stage {self.config.stage_id}: bad SamplingParams field: {error}") from None
        if isinstance(entry, SamplingParams):
            return entry
        raise ValueError(
            f"stage {self.config.stage_id} (ar) takes SamplingParams or a dict, got {type(entry).__name__}"
        )

    def run(self, prompts: list[Any], params: list[Any], use_tqdm: bool) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=use_tqdm)

    @staticmethod
    def text(output: Any) -> str:
        return output.outputs[0].text

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class DiTStageRunner:
    """A diffusion stage: a ``DiffusionEngine`` stepped in this process."""

    def __init__(self, config: OmniStageConfig) -> None:
        self.config = config
        self.engine = create_diffusion_engine(config.model_path, config.dit_config)
        self._ids = count()

    def params(self, entry: Any) -> DiffusionSamplingParams:
        """``DiffusionSamplingParams`` of one entry (``None``, a dict of its fields, or the object)."""
        if entry is None:
            return DiffusionSamplingParams()
        if isinstance(entry, dict):
            return DiffusionSamplingParams.from_dict(entry)
        if isinstance(entry, DiffusionSamplingParams):
            return entry
        raise ValueError(
            f"stage {self.config.stage_id} (dit) takes DiffusionSamplingParams or a dict, "
            f"got {type(entry).__name__}"
        )

    def run(self, prompts: list[Any], params: list[DiffusionSamplingParams], use_tqdm: bool) -> list:
        """Queue every prompt (none if one is invalid), then step until all are done."""
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
        results = self._step_until_done(set(ids), use_tqdm)
        return [results[request_id] for request_id in ids]

    def _step_until_done(self, ids: set[str], use_tqdm: bool) -> dict[str, DiffusionOutput]:
        results: dict[str, DiffusionOutput] = {}
        desc = f"Stage {self.config.stage_id} (dit)"
        with tqdm(total=len(ids), desc=desc, disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for output in self.engine.step():
                    if output.request_id in ids:
                        results[output.request_id] = output
                        bar.update(1)
        return results

    def close(self) -> None:
        """Nothing to stop: the engine lives in this process."""


def make_stage_runner(config: OmniStageConfig) -> ARStageRunner | DiTStageRunner:
    return ARStageRunner(config) if config.engine_type == "ar" else DiTStageRunner(config)
