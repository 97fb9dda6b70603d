"""A stage's own process: build the stage's engine, then serve the manager's messages until told to stop.

The launcher starts ``python -c "from vllm_omni.pipeline.stage_process import main; main()"``: a fresh
interpreter that never imports the user's ``__main__`` (scripts without a main guard, ``python -c`` and
code on stdin all work). It reads its :class:`StageBootstrap` from stdin and talks to the manager over the
channel whose socket it inherited. The messages are those of ``vllm_omni.pipeline.protocol``.

The process leads a process group of its own (what it starts, e.g. vLLM's EngineCore, joins it, so the
launcher can stop them all; Ctrl-C at a terminal reaches only the manager, which shuts the stages down).
When the manager is gone (its end of the channel closes) the stage stops at once, unlinking the
pipeline's shared memory: a killed manager leaves nothing behind.

``start_engine`` and ``serve`` (with ``StageLoop``) are the stage's life in any launcher: a Ray actor
(``vllm_omni.pipeline.ray_launcher``) runs them too, over its own connection and codec.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Protocol

from vllm_omni.config.stage import OmniStageConfig, parse_cpu_list
from vllm_omni.pipeline.channel import Channel
from vllm_omni.pipeline.kinds.base import StageEngine, StageKind
from vllm_omni.pipeline.protocol import (
    AbortRequests,
    AddRequests,
    ExtendRequest,
    StageFailed,
    StageMessageType,
    StageOutput,
    StageOutputs,
    StageReady,
    StageReply,
    StageStartFailed,
)
from vllm_omni.pipeline.stage_io import MessageCodec, SharedMemoryCodec
from vllm_omni.pipeline.stage_metrics import StageMetrics, StepHistogram


@dataclass(frozen=True)
class StageBootstrap:
    """What a stage process needs to start."""

    config: OmniStageConfig
    kind: StageKind
    """The stage's kind, resolved in the manager's process (pickled by reference to its module)."""
    channel_fd: int
    """The inherited socket of the stage's end of the channel."""
    codec: SharedMemoryCodec
    """How the pipeline's messages travel (its shared-memory prefix and threshold)."""


def main() -> None:
    """Entry point of a stage process: sys.path, then the bootstrap, from stdin."""
    sys.path[:] = pickle.load(sys.stdin.buffer)  # the manager's, before anything of its is unpickled
    bootstrap: StageBootstrap = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = bootstrap.config
    pin_cpus(config)
    inbox: queue.Queue = queue.Queue()
    loading = [True]
    channel = Channel(socket.socket(fileno=bootstrap.channel_fd), inbox, on_closed=lambda: _orphaned(loading))
    engine = start_engine(config, bootstrap.kind, channel, bootstrap.codec)
    loading[0] = False
    if engine is None:
        channel.close()
        sys.exit(1)
    try:
        orphaned = serve(config, engine, inbox, channel, bootstrap.codec)
    finally:
        channel.close()
    if orphaned:  # nobody consumes the pipeline's segments any more
        bootstrap.codec.sweep()


def pin_cpus(config: OmniStageConfig) -> None:
    """Run on the stage's ``cpus`` (inherited by what the stage starts: vLLM's EngineCore, workers)."""
    if config.cpus is not None:
        os.sched_setaffinity(0, parse_cpu_list(config.cpus))


def start_engine(
    config: OmniStageConfig, kind: StageKind, channel: Sender, codec: MessageCodec
) -> StageEngine | None:
    """Build the stage's engine and report it ready with its limits; None (and the traceback sent as
    ``StageStartFailed``) when it fails."""
    try:
        engine = kind.make_engine(config)
    except BaseException:
        channel.send(codec.dumps(StageStartFailed(config.stage_id, traceback.format_exc())))
        return None
    channel.send(codec.dumps(StageReady(config.stage_id, engine.limits())))
    return engine


def serve(
    config: OmniStageConfig, engine: StageEngine, inbox: queue.Queue, channel: Sender, codec: MessageCodec
) -> bool:
    """Run the stage loop until told to stop (False) or the manager is gone (True), then close the engine;
    an engine failure is reported (``StageFailed``) and raised."""
    try:
        return StageLoop(config.stage_id, engine, inbox, channel, codec).run()
    except BaseException:
        channel.send(codec.dumps(StageFailed(config.stage_id, traceback.format_exc())))
        raise
    finally:
        engine.close()


def _orphaned(loading: list[bool]) -> None:
    """The manager is gone: a stage still loading its engine stops with what it started, at once."""
    if loading[0]:
        os.killpg(0, signal.SIGKILL)


class Sender(Protocol):
    """The stage's end of its connection, as the loop uses it: a ``Channel``, or a Ray actor's outbox."""

    def send(self, data: Any) -> None: ...


class StageLoop:
    """Applies the manager's messages, then runs one engine step while work is queued.

    Stats and metrics are answered after the step that follows them, so they show the engine once the
    messages before them took effect (e.g. an abort's memory freed). The loop times every step and counts
    the requests that failed, for ``GetMetrics``.
    """

    def __init__(
        self, stage_id: int, engine: StageEngine, inbox: queue.Queue, channel: Sender, codec: MessageCodec
    ) -> None:
        """``inbox``: the manager's messages as ``(tag, data)`` items, data None when the manager is gone."""
        self.stage_id, self.engine, self.inbox, self.channel = stage_id, engine, inbox, channel
        self.codec = codec
        self.active: set[str] = set()
        self.step_seconds = StepHistogram()
        self.num_failed_requests = 0

    def send(self, message: object) -> None:
        self.channel.send(self.codec.dumps(message))

    def run(self) -> bool:
        """Serve until told to stop (returns False) or until the manager is gone (returns True)."""
        while True:
            queries = []
            for message in self._receive(block=not self.engine.has_unfinished_requests()):
                if message is None:
                    return True
                if message.type is StageMessageType.SHUTDOWN:
                    return False
                if message.type in (StageMessageType.GET_STATS, StageMessageType.GET_METRICS):
                    queries.append(message)
                else:
                    self._apply(message)
            if self.engine.has_unfinished_requests():
                self._step()
            for message in queries:
                value = self.engine.stats() if message.type is StageMessageType.GET_STATS else self.metrics()
                self.send(StageReply(self.stage_id, message.token, value))

    def metrics(self) -> StageMetrics:
        """The engine's metrics with the loop's step times and failure count."""
        failed = self.num_failed_requests
        return replace(self.engine.metrics(), step_seconds=self.step_seconds, num_failed_requests=failed)

    def _receive(self, block: bool) -> list:
        """Messages waiting in the inbox (``None`` when the manager is gone); waits for one if ``block``."""
        messages = []
        try:
            item = self.inbox.get(block=block)
            while True:
                data = item[1]
                messages.append(None if data is None else self.codec.loads(data))
                item = self.inbox.get_nowait()
        except queue.Empty:
            return messages

    def _apply(self, message: AddRequests | ExtendRequest | AbortRequests) -> None:
        if message.type is StageMessageType.ADD:
            error = None
            try:
                self.engine.add(message.requests)
                self.active.update(request.request_id for request in message.requests)
            except Exception as exc:
                error = (type(exc).__name__, str(exc))
            self.send(StageReply(self.stage_id, message.token, error=error))
        elif message.type is StageMessageType.EXTEND and message.request_id in self.active:
            try:
                self.engine.extend(message.request_id, message.prompt, message.done)
            except Exception as exc:  # the request fails here; the engine keeps serving
                self._fail(message.request_id, f"{type(exc).__name__}: {exc}")
        elif message.type is StageMessageType.ABORT:
            ids = [request_id for request_id in message.request_ids if request_id in self.active]
            self.active.difference_update(ids)
            self.engine.abort(ids)

    def _fail(self, request_id: str, error: str) -> None:
        self.active.discard(request_id)
        self.engine.abort([request_id])
        self.num_failed_requests += 1
        self.send(StageOutputs(self.stage_id, [StageOutput(request_id, True, error, self.codec.dumps(None))]))

    def _step(self) -> None:
        start = time.perf_counter()
        events = self.engine.step()
        self.step_seconds.observe(time.perf_counter() - start)
        events = [event for event in events if event.request_id in self.active]
        self.num_failed_requests += sum(event.error is not None for event in events)
        self.active.difference_update(event.request_id for event in events if event.finished)
        if events:
            dumps = self.codec.dumps
            outputs = [StageOutput(e.request_id, e.finished, e.error, dumps(e.output)) for e in events]
            self.send(StageOutputs(self.stage_id, outputs))
