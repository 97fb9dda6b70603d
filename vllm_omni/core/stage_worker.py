"""The main loop of a stage process: one stage engine, fed and drained through two queues.

Messages in (``dumps`` bytes): ``("add", token, [(request_id, prompt, params), ...])``,
``("abort", [request_ids])``, ``("stats", token)``, ``("shutdown",)``.
Messages out: ``("ready", stage_id)`` or ``("start_failed", stage_id, traceback)``;
``("added", stage_id, token, None or (error type name, message))``;
``("outputs", stage_id, [(request_id, output, finished), ...])`` once per engine step with news;
``("stats", stage_id, token, dict)``; ``("error", stage_id, traceback)`` before exiting on an engine failure.

The process leads a process group of its own (what it starts, e.g. vLLM's EngineCore, joins it, so the
launcher can stop them all; Ctrl-C at a terminal reaches only the manager, which shuts the stages down)
and exits by itself when its manager is gone, unlinking the pipeline's shared memory: a killed manager
leaves nothing behind.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback
from collections.abc import Callable
from typing import Any

from vllm_omni.config.stage import OmniStageConfig, parse_cpu_list
from vllm_omni.core.stage_io import dumps, loads, sweep

IDLE_POLL_SECONDS = 0.5
"""How often an idle stage checks that its manager is alive."""


def run_stage(config: OmniStageConfig, inbox: Any, outbox: Any, prefix: str, threshold: int) -> None:
    """Process entry point: build the stage's engine, then serve ``inbox`` until told to stop."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.cpus is not None:  # inherited by what the stage starts (vLLM's EngineCore, workers)
        os.sched_setaffinity(0, parse_cpu_list(config.cpus))
    parent = os.getppid()

    def send(message: tuple) -> None:
        outbox.put(dumps(message, threshold, prefix))

    from vllm_omni.core.stage_engine import make_stage_engine

    try:
        engine = make_stage_engine(config)
    except BaseException:
        send(("start_failed", config.stage_id, traceback.format_exc()))
        return
    send(("ready", config.stage_id))
    try:
        orphaned = StageLoop(config.stage_id, engine, inbox, send, parent).run()
    except BaseException:
        send(("error", config.stage_id, traceback.format_exc()))
        raise
    finally:
        engine.close()
    if orphaned:  # nobody reads the outbox or consumes its segments any more
        outbox.cancel_join_thread()
        sweep(prefix)


class StageLoop:
    """Alternates between the inbox (adds, aborts, stats) and one engine step while work is queued."""

    def __init__(
        self, stage_id: int, engine: Any, inbox: Any, send: Callable[[tuple], None], parent: int
    ) -> None:
        self.stage_id, self.engine, self.inbox, self.send, self.parent = stage_id, engine, inbox, send, parent
        self.active: set[str] = set()

    def run(self) -> bool:
        """Serve until told to stop (returns False) or until the manager is gone (returns True)."""
        while True:
            for message in self._receive(block=not self.engine.has_unfinished_requests()):
                if message[0] == "shutdown":
                    return False
                self._handle(message)
            if os.getppid() != self.parent:
                return True
            if self.engine.has_unfinished_requests():
                self._step()

    def _receive(self, block: bool) -> list[tuple]:
        messages = []
        try:
            if block:
                messages.append(loads(self.inbox.get(timeout=IDLE_POLL_SECONDS)))
            while True:
                messages.append(loads(self.inbox.get_nowait()))
        except queue.Empty:
            return messages

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, token, requests = message
            error = None
            try:
                self.engine.add(requests)
                self.active.update(request_id for request_id, _, _ in requests)
            except Exception as exc:
                error = (type(exc).__name__, str(exc))
            self.send(("added", self.stage_id, token, error))
        elif kind == "abort":
            ids = [request_id for request_id in message[1] if request_id in self.active]
            self.active.difference_update(ids)
            self.engine.abort(ids)
        elif kind == "stats":
            self.send(("stats", self.stage_id, message[1], self.engine.stats()))

    def _step(self) -> None:
        events = [event for event in self.engine.step() if event[0] in self.active]
        self.active.difference_update(request_id for request_id, _, finished in events if finished)
        if events:
            self.send(("outputs", self.stage_id, events))
