"""``echo``: a tiny stage kind for tests and benchmarks, and the smallest example of adding a kind.

An echo stage makes a tensor (prompt ``{"nbytes": n}``) or takes one handed on by an earlier stage
(prompt ``{"tensor": t, "made": time}``, built by the ``echo_tensor`` stage-input function) and returns
it at its next step, with the time the tensor was made and how long the hand-off took until the tensor
was read whole (``time.perf_counter`` is one clock for every process of a machine). Its ``engine_args``
are its options: ``exit_at_start`` (an exit code) and ``raise_at_start`` (a message) make the stage fail
while it starts.

Importing this module registers the kind (``engine_type="echo"``) and the stage-input function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.kinds import register_stage_kind
from vllm_omni.pipeline.kinds.base import StageEngine, StageEvent, StageKind
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import StageRequest
from vllm_omni.pipeline.stage_input import StageInput, register_stage_input

OPTIONS = ("exit_at_start", "raise_at_start")


@dataclass
class EchoOutput:
    """An echo stage's output for one request."""

    tensor: torch.Tensor
    made: float
    """When the tensor was made (``time.perf_counter``)."""
    handoff_seconds: float | None = None
    """From ``made`` until this stage had the tensor (None: the stage made it)."""


class EchoStageKind(StageKind):
    name = "echo"
    output_modalities = ("latent",)
    input_modalities = ("latent",)

    def check_config(self, config: OmniStageConfig) -> None:
        super().check_config(config)
        unknown = sorted(set(config.engine_args) - set(OPTIONS))
        if unknown:
            raise ValueError(f"stage {config.stage_id}: echo options are {list(OPTIONS)}, not {unknown}")

    def make_params(self, config: OmniStageConfig, entry: Any) -> None:
        if entry is not None:
            raise ValueError(f"stage {config.stage_id} (echo) takes no params, got {entry!r}")

    def make_engine(self, config: OmniStageConfig) -> EchoStageEngine:
        if "exit_at_start" in config.engine_args:
            print("echo stage: exiting while it starts", flush=True)
            os._exit(config.engine_args["exit_at_start"])
        if "raise_at_start" in config.engine_args:
            raise RuntimeError(config.engine_args["raise_at_start"])
        return EchoStageEngine()

    def merge_output(self, result: OmniRequestOutput, output: EchoOutput) -> None:
        result.latents = output.tensor


class EchoStageEngine(StageEngine):
    def __init__(self) -> None:
        self.ready: list[tuple[str, EchoOutput]] = []

    def add_one(self, request: StageRequest) -> None:
        prompt = request.prompt
        if "tensor" in prompt:
            prompt["tensor"].sum()  # read every byte: a hand-off ends when the tensor is usable
            output = EchoOutput(prompt["tensor"], prompt["made"], time.perf_counter() - prompt["made"])
        else:
            output = EchoOutput(torch.arange(prompt["nbytes"] // 4, dtype=torch.float32), time.perf_counter())
        self.ready.append((request.request_id, output))

    def abort(self, request_ids: list[str]) -> None:
        self.ready = [(i, output) for i, output in self.ready if i not in request_ids]

    def step(self) -> list[StageEvent]:
        ready, self.ready = self.ready, []
        return [StageEvent(request_id, output, True) for request_id, output in ready]

    def has_unfinished_requests(self) -> bool:
        return bool(self.ready)

    def stats(self) -> dict[str, int]:
        return {"unfinished": len(self.ready)}

    def limits(self) -> None:
        return None


@register_stage_input("echo_tensor", needs="latent", targets=("echo",))
def echo_tensor(data: StageInput) -> dict[str, Any]:
    """The source echo stage's tensor, passed on as it is."""
    return {"tensor": data.source.tensor, "made": data.source.made}


ECHO_STAGE = EchoStageKind()
register_stage_kind("echo", f"{__name__}:ECHO_STAGE")
