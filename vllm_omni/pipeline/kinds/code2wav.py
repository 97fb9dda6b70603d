"""The ``code2wav`` stage kind: Qwen2.5-Omni's token2wav (codec tokens -> DiT mel -> BigVGAN waveform).

A stage's ``model_path`` is a Qwen2.5-Omni checkpoint folder, its ``engine_args`` are
:class:`~vllm_omni.config.code2wav.Code2WavConfig` fields, a prompt is ``{"codes": [codec token ids]}``
and its params a :class:`~vllm_omni.audio.code2wav_request.Code2WavParams` (voice, seed, ODE steps,
chunking). The request's audio becomes ``OmniRequestOutput.audio``; when the pipeline streams, each chunk is
a snapshot, and the stage takes the codes while the talker makes them (``takes_input_while_made``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vllm_omni.audio.code2wav_request import Code2WavLimits, Code2WavOutput, Code2WavParams
from vllm_omni.config.code2wav import Code2WavConfig
from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.kinds.base import StageEngine, StageEvent, StageKind, StageRoute
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import StageRequest
from vllm_omni.pipeline.stage_metrics import StageMetrics


class Code2WavStageKind(StageKind):
    """Codec token ids in, a 24 kHz float32 waveform out."""

    name = "code2wav"
    output_modalities = ("audio",)
    input_modalities = ("audio_codes",)

    def check_config(self, config: OmniStageConfig) -> None:
        if config.dit_config is not None:
            raise ValueError(f"stage {config.stage_id}: a 'code2wav' stage takes engine_args, not dit_config")
        Code2WavConfig.from_dict(config.engine_args)
        super().check_config(config)

    def make_params(self, config: OmniStageConfig, entry: Any) -> Code2WavParams:
        if entry is None:
            return Code2WavParams()
        if isinstance(entry, dict):
            return Code2WavParams.from_dict(entry)
        if isinstance(entry, Code2WavParams):
            return entry
        got = type(entry).__name__
        raise ValueError(f"stage {config.stage_id} (code2wav) takes Code2WavParams or a dict, got {got}")

    def prepare_params(
        self, config: OmniStageConfig, params: Code2WavParams, route: StageRoute
    ) -> Code2WavParams:
        """Send chunks as they are made only where someone sees them: a final stage of a stream."""
        return dataclasses.replace(params, emit_chunks=route.streaming and config.final_output)

    def takes_input_while_made(self, params: Code2WavParams) -> bool:
        """A request that sends its chunks as they are made takes the codes as the talker makes them."""
        return params.emit_chunks and params.chunk_size is not None

    def check_params(self, limits: Code2WavLimits, params: Code2WavParams) -> None:
        limits.check_params(params)

    def queue_bound(self, limits: Code2WavLimits) -> int:
        return limits.max_num_requests

    def make_engine(self, config: OmniStageConfig) -> Code2WavStageEngine:
        return Code2WavStageEngine(config)

    def merge_output(self, result: OmniRequestOutput, output: Code2WavOutput) -> None:
        """``result.audio``: the request's audio so far (chunks appended as they come)."""
        if output.sample_offset == 0:
            result.audio = output.waveform
        else:
            result.audio = np.concatenate([result.audio[: output.sample_offset], output.waveform])

    def summarize(self, output: Code2WavOutput) -> dict[str, Any]:
        return {"num_codes": output.num_codes, "sample_rate": output.sample_rate}


class Code2WavStageEngine(StageEngine):
    """A :class:`~vllm_omni.audio.code2wav_engine.Code2WavEngine`, stepped in the stage's process."""

    def __init__(self, config: OmniStageConfig) -> None:
        from vllm_omni.audio.code2wav_engine import Code2WavEngine

        self.engine = Code2WavEngine(config.model_path, Code2WavConfig.from_dict(config.engine_args))

    def add_one(self, request: StageRequest) -> None:
        self.engine.add_request(request.request_id, request.prompt, request.params, open=request.open)

    def extend(self, request_id: str, prompt: Any, done: bool) -> None:
        self.engine.extend_request(request_id, prompt, done)

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_requests(request_ids)

    def step(self) -> list[StageEvent]:
        return [StageEvent(o.request_id, o, o.finished) for o in self.engine.step()]

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting)}

    def metrics(self) -> StageMetrics:
        return StageMetrics(num_running=len(self.engine.running), num_waiting=len(self.engine.waiting))

    def limits(self) -> Code2WavLimits:
        return self.engine.limits


CODE2WAV_STAGE = Code2WavStageKind()
