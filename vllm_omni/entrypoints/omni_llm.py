"""``OmniLLM``: offline inference through an omni pipeline of stages."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.omni_params import pipeline_params
from vllm_omni.pipeline.model_pipelines import pipeline_of
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.stage_manager import StageManager

POLL_SECONDS = 1.0


class OmniLLM:
    """Offline pipeline of stages, each served by its own engine in its own process (use it from one
    thread; ``AsyncOmniLLM`` serves concurrent callers).

    One request per prompt flows through the stages; ``generate`` returns an :class:`OmniRequestOutput`
    per prompt, in order. Stages overlap across requests: a request moves to the next stage as soon as
    its current stage has finished it. Hand-offs: text (an ``ar`` stage's text is the next prompt), prompt
    hidden states (an ``ar`` stage's, as a ``dit`` stage's ``prompt_embeds``), images (a ``dit`` stage's
    image is the next ``dit`` stage's init image), or a registered stage-input function of your own.
    """

    def __init__(self, stages: Sequence[OmniStageConfig] | str | Path, **manager_options: Any) -> None:
        """``stages``: the stage configs, the path of a YAML pipeline file (``load_pipeline_file``), or a
        model (folder or hub id) whose pipeline it implies (``stages_for_model``: e.g. a Qwen2.5-Omni's
        thinker -> talker -> code2wav). ``manager_options``: :class:`StageManager` options (``launcher``:
        ``"local"``, ``"ray"`` or a launcher object, by default the file's ``launcher``;
        ``shm_threshold``)."""
        self.stages, launcher = pipeline_of(stages)
        self.manager = StageManager(self.stages, **{"launcher": launcher, **manager_options})
        self._ids = count()

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        use_tqdm: bool = True,
        modalities: list[str] | list[list[str]] | None = None,
    ) -> list[OmniRequestOutput]:
        """Run ``prompts`` (one prompt or a list; a prompt is a string or a dict) through the pipeline.

        ``sampling_params``: a list with one entry per stage (for a pipeline of several stages), or a single
        entry for every stage; an entry is the stage's params object (``vllm.SamplingParams`` for ``ar``,
        ``DiffusionSamplingParams`` for ``dit``), a dict of its fields, or a list with one per prompt
        (``vllm_omni.entrypoints.omni_params.pipeline_params``).
        ``modalities``: the outputs wanted (e.g. ``["text"]``; default: every final stage's), for every
        prompt or a list per prompt (e.g. a Qwen2.5-Omni request without audio: ``["text"]``); the requests
        skip the stages after the last one making them (ValueError naming what the pipeline offers).
        Every stage's params are checked before anything runs (ValueError naming the stage and the field).
        A prompt the first stage rejects fails the call (ValueError) and runs nothing; a later stage's
        rejection or failure is the request's ``error``. More prompts than the stages' queues hold are fed
        as earlier ones leave (a first-stage rejection among those fails the call and aborts the rest).
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = pipeline_params(self.stages, sampling_params, len(prompts), False, modalities)
        for stage_params in params:
            self.manager.check_params(stage_params)
        ids = [f"omni-{next(self._ids)}" for _ in prompts]
        waiting = list(zip(ids, prompts, params, strict=True))
        results: dict[str, OmniRequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Omni requests", disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    waiting = self._admit(waiting)
                    for update in self.manager.poll(POLL_SECONDS):
                        if update.finished and update.request_id in ids:
                            results[update.request_id] = update
                            bar.update(1)
                    if self.manager.dead is not None:
                        raise self.manager.dead
        finally:  # interrupted (Ctrl-C in a notebook): what is left of this call stops
            self.manager.abort([i for i in ids if i not in results])
        return [results[request_id] for request_id in ids]

    def _admit(self, waiting: list[tuple[str, Any, list[Any]]]) -> list[tuple[str, Any, list[Any]]]:
        """Send as many waiting requests as the pipeline takes now; returns the rest."""
        slots = self.manager.free_slots()
        admitted, rest = (waiting, []) if slots is None else (waiting[:slots], waiting[slots:])
        if admitted:
            self.manager.add_requests(admitted)
        return rest

    def stage_stats(self, stage_id: int, replica: int | None = None) -> dict[str, Any]:
        """What stage ``stage_id``'s engine holds now (requests, bytes): one replica's, or its live
        replicas' together (``StageManager.stage_stats``)."""
        return self.manager.stage_stats(stage_id, replica)

    def close(self) -> None:
        """Stop every stage's process."""
        self.manager.shutdown()
