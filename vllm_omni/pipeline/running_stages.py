"""The started stages of one pipeline: their handles, their messages, their limits, their end.

``RunningStages`` starts every replica of every stage through a launcher (they load in parallel), waits
until each has reported ready with its limits, and from then on sends and receives the pipeline's messages
(``vllm_omni.pipeline.protocol``), tells which replica died and how, and stops them all. Replicas are
numbered in one flat list of *slots* (stage 0's replicas first); a message names its slot. It knows nothing
of requests; the ``StageManager`` does.
"""

from __future__ import annotations

import queue
import weakref
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.launcher import StageHandle, StageLauncher, make_launcher
from vllm_omni.pipeline.protocol import Shutdown, StageMessageType
from vllm_omni.pipeline.stage_io import MessageCodec

STOP_TIMEOUT_SECONDS = 30.0
"""How long ``stop`` waits for a stage to exit cleanly before killing it."""
LIVENESS_SECONDS = 0.2
"""How often a wait for the stages checks that they are alive."""


class OmniStageError(RuntimeError):
    """A stage failed to start, died, or its engine failed; the message names the stage."""


class RunningStages:
    """Every stage of a pipeline, started and ready."""

    def __init__(
        self, stages: list[OmniStageConfig], launcher: StageLauncher | str | None, shm_threshold: int
    ) -> None:
        """Start every stage (``launcher``: see ``make_launcher``) and wait until all are ready
        (OmniStageError naming a stage that is not)."""
        self.stages = stages
        launcher = make_launcher(launcher)
        self.codec: MessageCodec = launcher.codec(shm_threshold)
        """How the pipeline's messages travel (the launcher's choice)."""
        self.slots = [(stage.stage_id, replica) for stage in stages for replica in range(stage.replicas)]
        """``(stage_id, replica)`` of each slot."""
        self.handles: list[StageHandle] = []
        """Each slot's handle."""
        self.limits: list[Any] = [None] * len(stages)
        """What each stage accepts (its kind's limits object), as its replicas reported when ready."""
        self._received: queue.Queue = queue.Queue()
        self.stop = weakref.finalize(self, _stop_all, self.handles, self.codec)
        """Stop every stage and what it started, unlink the pipeline's segments (idempotent; also at exit)."""
        try:
            for slot, (stage_id, replica) in enumerate(self.slots):
                config = stages[stage_id].for_replica(replica)
                self.handles.append(launcher.launch(config, slot, self._received, self.codec))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def send(self, slot: int, message: Any, forwarded: list[str] | None = None) -> None:
        """Send ``message`` to a slot's replica (``forwarded``: see ``MessageCodec``)."""
        self.handles[slot].send(self.codec.dumps(message, forwarded))

    def receive(self, timeout: float) -> tuple[int, Any] | None:
        """The next ``(slot, message)`` (message None: the replica is gone), waiting up to ``timeout``."""
        try:
            slot, data = self._received.get(timeout=timeout) if timeout > 0 else self._received.get_nowait()
        except queue.Empty:
            return None
        return slot, None if data is None else self.codec.loads(data)

    def slots_of(self, stage_id: int) -> list[int]:
        """The slots of a stage's replicas."""
        return [slot for slot, (stage, _) in enumerate(self.slots) if stage == stage_id]

    def dead(self) -> list[int]:
        """The slots whose replica is no longer running."""
        return [slot for slot, handle in enumerate(self.handles) if not handle.is_alive()]

    def label(self, slot: int) -> str:
        """How errors name a slot's replica: ``stage 1 (dit)``, ``stage 1 (dit) replica 0``."""
        stage_id, replica = self.slots[slot]
        return self.stages[stage_id].replica_label(replica)

    def error(self, slot: int, what: str | None = None) -> OmniStageError:
        """The error of a slot's replica: ``what`` happened, or how its process ended."""
        return OmniStageError(f"{self.label(slot)} {what or self.handles[slot].exit_description()}")

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < len(self.slots):
            item = self.receive(LIVENESS_SECONDS)
            if item is None:
                if dead := self.dead():
                    raise self.error(dead[0])
                continue
            slot, message = item
            if message is None:
                raise self.error(slot)
            if message.type is StageMessageType.READY:
                self.limits[self.slots[slot][0]] = message.limits
                ready.add(slot)
            elif message.type is StageMessageType.START_FAILED:
                label, how = self.label(slot), self.handles[slot].exit_description()
                raise OmniStageError(f"{label} failed to start:\n{message.error}{label} {how}")


def _stop_all(handles: list[StageHandle], codec: MessageCodec) -> None:
    for handle in handles:
        if handle.is_alive():
            handle.send(codec.dumps(Shutdown()))
    for handle in handles:
        handle.stop(STOP_TIMEOUT_SECONDS)
    codec.sweep()
