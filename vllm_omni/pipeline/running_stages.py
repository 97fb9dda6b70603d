"""The started stages of one pipeline: their handles, their messages, their limits, their end.

``RunningStages`` starts every stage through a launcher (they load in parallel), waits until each has
reported ready with its limits, and from then on sends and receives the pipeline's messages
(``vllm_omni.pipeline.protocol``), tells which stage died and how, and stops them all. It knows nothing
of requests; the ``StageManager`` does.
"""

from __future__ import annotations

import queue
import weakref
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.launcher import LocalProcessLauncher, StageHandle, StageLauncher
from vllm_omni.pipeline.protocol import Shutdown, StageMessageType
from vllm_omni.pipeline.stage_io import dumps, loads, new_segment_prefix, sweep

STOP_TIMEOUT_SECONDS = 30.0
"""How long ``stop`` waits for a stage to exit cleanly before killing it."""
LIVENESS_SECONDS = 0.2
"""How often a wait for the stages checks that they are alive."""


class OmniStageError(RuntimeError):
    """A stage failed to start, died, or its engine failed; the message names the stage."""


class RunningStages:
    """Every stage of a pipeline, started and ready."""

    def __init__(
        self, stages: list[OmniStageConfig], launcher: StageLauncher | None, shm_threshold: int
    ) -> None:
        """Start every stage and wait until all are ready (OmniStageError naming a stage that is not)."""
        self.stages = stages
        self.threshold, self.prefix = shm_threshold, new_segment_prefix()
        self.handles: list[StageHandle] = []
        self.limits: list[Any] = [None] * len(stages)
        """What each stage accepts (its kind's limits object), as it reported when ready."""
        self._received: queue.Queue = queue.Queue()
        self.stop = weakref.finalize(self, _stop_all, self.handles, self.prefix)
        """Stop every stage and what it started, unlink the pipeline's segments (idempotent; also at exit)."""
        try:
            for stage in stages:
                launched = (launcher or LocalProcessLauncher()).launch(stage, self._received, self.prefix,
                                                                       shm_threshold)  # fmt: skip
                self.handles.append(launched)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def send(self, stage_id: int, message: Any, forwarded: list[str] | None = None) -> None:
        """Send ``message`` to a stage (``forwarded``: see ``stage_io.dumps``)."""
        self.handles[stage_id].send(dumps(message, self.threshold, self.prefix, forwarded))

    def receive(self, timeout: float) -> tuple[int, Any] | None:
        """The next ``(stage_id, message)`` (message None: the stage is gone), waiting up to ``timeout``."""
        try:
            stage_id, data = (
                self._received.get(timeout=timeout) if timeout > 0 else self._received.get_nowait()
            )
        except queue.Empty:
            return None
        return stage_id, None if data is None else loads(data)

    def first_dead(self) -> tuple[int, str] | None:
        """``(stage_id, how it ended)`` of a stage that is no longer running, if any."""
        for stage_id, handle in enumerate(self.handles):
            if not handle.is_alive():
                return stage_id, handle.exit_description()
        return None

    def error(self, stage_id: int, what: str | None = None) -> OmniStageError:
        """The error of stage ``stage_id``: ``what`` happened, or how its process ended."""
        return OmniStageError(
            f"{self.stages[stage_id].label} {what or self.handles[stage_id].exit_description()}"
        )

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < len(self.stages):
            item = self.receive(LIVENESS_SECONDS)
            if item is None:
                if (dead := self.first_dead()) is not None:
                    raise self.error(*dead)
                continue
            stage_id, message = item
            if message is None:
                raise self.error(stage_id)
            if message.type is StageMessageType.READY:
                self.limits[stage_id] = message.limits
                ready.add(stage_id)
            elif message.type is StageMessageType.START_FAILED:
                label, how = self.stages[stage_id].label, self.handles[stage_id].exit_description()
                raise OmniStageError(f"{label} failed to start:\n{message.error}{label} {how}")


def _stop_all(handles: list[StageHandle], prefix: str) -> None:
    for handle in handles:
        if handle.is_alive():
            handle.send(dumps(Shutdown()))
    for handle in handles:
        handle.stop(STOP_TIMEOUT_SECONDS)
    sweep(prefix)
