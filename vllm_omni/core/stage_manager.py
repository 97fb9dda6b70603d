"""StageManager: one engine per stage, each in its own process; requests flow from stage to stage.

The manager starts every stage through a launcher (local processes by default), sends each request to
the first stage and, when a stage finishes it, calls the next stage's stage-input function and sends the
result on. Stages work on different requests at once (stage 0 on request i+1 while stage 1 is on
request i). Messages go through queues; large tensors through shared memory (``stage_io``). A stage
that dies fails every pending request with an error naming it; ``shutdown`` stops every process.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.core.launcher import LocalProcessLauncher, StageLauncher
from vllm_omni.core.outputs import OmniRequestOutput
from vllm_omni.core.stage_input import StageInput, default_stage_input, get_stage_input
from vllm_omni.core.stage_io import SHM_THRESHOLD_BYTES, dumps, loads, segment_prefix, sweep

LIVENESS_SECONDS = 0.2
"""How often a waiting manager checks that its stages are alive."""
STOP_TIMEOUT_SECONDS = 30.0
"""How long ``shutdown`` waits for a stage to exit cleanly before killing it."""


class OmniStageError(RuntimeError):
    """A stage failed to start, died, or its engine failed; the message names the stage."""


@dataclass
class _Request:
    params: list[Any]
    """The request's params object for each stage."""
    result: OmniRequestOutput
    stage: int = 0
    """The stage serving the request now."""


class StageManager:
    """Runs the stages of a pipeline and moves requests through them."""

    def __init__(
        self,
        stages: Sequence[OmniStageConfig],
        launcher: StageLauncher | None = None,
        shm_threshold: int = SHM_THRESHOLD_BYTES,
    ) -> None:
        """Start every stage (they load in parallel) and wait until all are ready."""
        self.stages = list(stages)
        check_pipeline(self.stages)
        self.stage_inputs = [_stage_input_fn(self.stages, s) for s in self.stages]
        self.threshold, self.prefix = shm_threshold, segment_prefix(os.getpid())
        launcher = launcher or LocalProcessLauncher()
        self.outbox = launcher.queue_context.Queue()
        self.inboxes = [launcher.queue_context.Queue() for _ in self.stages]
        self.handles: list[Any] = []
        self._finalizer = weakref.finalize(self, _stop_all, self.handles, self.inboxes, self.prefix)
        self.requests: dict[str, _Request] = {}
        self.dead: OmniStageError | None = None
        self._updates: list[OmniRequestOutput] = []
        self._replies: dict[int, Any] = {}
        self._waited: set[int] = set()
        self._adds: dict[int, list[str]] = {}
        self._tokens = count()
        self._lock = threading.RLock()
        self._replied = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._pump: threading.Thread | None = None
        self._last_check = 0.0
        try:
            for stage, inbox in zip(self.stages, self.inboxes, strict=True):
                self.handles.append(launcher.launch(stage, inbox, self.outbox, self.prefix, self.threshold))
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    # ---- requests ----------------------------------------------------------------------------------
    def add_requests(self, requests: list[tuple[str, Any, list[Any]]], wait: bool = True) -> None:
        """Send ``(request_id, prompt, params per stage)`` to the first stage.

        ``wait``: block until the first stage has validated them all (all or none are accepted; a
        rejection raises its error); otherwise a rejected request ends with an error update.
        """
        with self._lock:
            self._raise_if_dead()
            ids = [request_id for request_id, _, _ in requests]
            taken = sorted(set(ids) & set(self.requests)) or sorted({i for i in ids if ids.count(i) > 1})
            if taken:
                raise ValueError(f"request id(s) {taken} already in the pipeline")
            first = [(rid, self._first_input(prompt), params[0]) for rid, prompt, params in requests]
            for request_id, prompt, params in requests:
                result = OmniRequestOutput(request_id=request_id, prompt=prompt)
                self.requests[request_id] = _Request(params, result)
            token = self._send_add(0, first, wait)
            if wait:
                error = self._wait_reply(token)
                if error is not None:
                    for request_id, _, _ in requests:
                        self.requests.pop(request_id, None)
                    raise (ValueError if error[0] == "ValueError" else OmniStageError)(error[1])

    def _first_input(self, prompt: Any) -> Any:
        return self.stage_inputs[0](StageInput(prompt, {}, self.stages[0]))

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests in whichever stage serves them; each ends with an ``aborted`` update."""
        with self._lock:
            for request_id in request_ids:
                request = self.requests.pop(request_id, None)
                if request is None:
                    continue
                self._send(request.stage, ("abort", [request_id]))
                self._finish(request, error="aborted")

    def poll(self, timeout: float) -> list[OmniRequestOutput]:
        """Route what the stages sent, waiting up to ``timeout`` seconds for news; returns the snapshots
        of requests that progressed (finished ones with ``finished`` set). One thread polls at a time."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            message = self._receive(min(LIVENESS_SECONDS, max(remaining, 0.0)))
            with self._lock:
                while message is not None:
                    self._route(message)
                    message = self._receive(0.0)
                self._check_alive()
                if self._updates or remaining <= 0 or self.dead is not None:
                    updates, self._updates = self._updates, []
                    return updates

    def start_background(self, deliver: Callable[[list[OmniRequestOutput]], None]) -> None:
        """Poll in a thread of its own from now on, passing each batch of updates to ``deliver``."""

        def pump() -> None:
            while not self._stopping.is_set() and self.dead is None:
                updates = self.poll(LIVENESS_SECONDS)
                if updates:
                    deliver(updates)

        self._pump = threading.Thread(target=pump, name="omni-stage-manager", daemon=True)
        self._pump.start()

    def stage_stats(self, stage_id: int) -> dict[str, int]:
        """What stage ``stage_id``'s engine holds (requests, bytes)."""
        with self._lock:
            self._raise_if_dead()
            token = next(self._tokens)
            self._send(stage_id, ("stats", token))
            return self._wait_reply(token)

    def shutdown(self) -> None:
        """Stop every stage process (and what they started); idempotent; also runs at exit."""
        self._stopping.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join()
        self._finalizer()

    # ---- routing -----------------------------------------------------------------------------------
    def _receive(self, timeout: float) -> tuple | None:
        try:
            return loads(self.outbox.get(timeout=timeout) if timeout > 0 else self.outbox.get_nowait())
        except queue.Empty:
            return None

    def _route(self, message: tuple) -> None:
        kind, stage_id = message[0], message[1]
        if kind == "outputs":
            for request_id, output, finished in message[2]:
                self._on_output(stage_id, request_id, output, finished)
        elif kind in ("added", "stats"):
            self._on_reply(stage_id, *message[2:])
        elif kind in ("error", "start_failed"):
            self._on_dead(stage_id, f"failed:\n{message[2]}")

    def _on_output(self, stage_id: int, request_id: str, output: Any, finished: bool) -> None:
        request = self.requests.get(request_id)
        if request is None or request.stage != stage_id:
            return  # aborted or failed meanwhile
        result = request.result
        result.stage_outputs[stage_id] = output
        stage = self.stages[stage_id]
        if stage.engine_type == "ar" and stage.final_output:
            result.text = output.outputs[0].text
        error = getattr(output, "error", None)
        if error:
            self._finish(self.requests.pop(request_id), error=f"{_name(stage)}: {error}")
        elif not finished:
            self._snapshot(request, stage_id)
        elif stage_id == len(self.stages) - 1:
            self._finish(self.requests.pop(request_id), stage_id=stage_id)
        else:
            self._snapshot(request, stage_id)
            self._hand_off(request, stage_id + 1)

    def _hand_off(self, request: _Request, stage_id: int) -> None:
        result = request.result
        data = StageInput(result.prompt, result.stage_outputs, self.stages[stage_id])
        try:
            prompt = self.stage_inputs[stage_id](data)
        except Exception as exc:
            self.requests.pop(result.request_id)
            error = f"{_name(self.stages[stage_id])}: stage input failed: {type(exc).__name__}: {exc}"
            self._finish(request, error=error)
            return
        request.stage = stage_id
        self._send_add(stage_id, [(result.request_id, prompt, request.params[stage_id])])

    def _on_reply(self, stage_id: int, token: int, value: Any) -> None:
        if token in self._waited:
            self._replies[token] = value
            self._replied.notify_all()
            return
        request_ids = self._adds.pop(token, [])
        if value is None:  # accepted
            return
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and request.stage == stage_id:
                del self.requests[request_id]
                self._finish(request, error=f"{_name(self.stages[stage_id])}: {value[0]}: {value[1]}")

    def _snapshot(self, request: _Request, stage_id: int) -> None:
        result = request.result
        outputs = dict(result.stage_outputs)
        self._updates.append(dataclasses.replace(result, stage_outputs=outputs, stage_id=stage_id))

    def _finish(self, request: _Request, stage_id: int | None = None, error: str | None = None) -> None:
        result = request.result
        result.stage_id, result.finished, result.error = stage_id, True, error
        for stage in self.stages:
            output = result.stage_outputs.get(stage.stage_id)
            if stage.engine_type == "dit" and stage.final_output and output is not None:
                result.images, result.latents = output.images, output.latents
        self._updates.append(result)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _send(self, stage_id: int, message: tuple) -> None:
        self.inboxes[stage_id].put(dumps(message, self.threshold, self.prefix))

    def _send_add(self, stage_id: int, requests: list[tuple[str, Any, Any]], wait: bool = False) -> int:
        token = next(self._tokens)
        if wait:
            self._waited.add(token)
        else:
            self._adds[token] = [request_id for request_id, _, _ in requests]
        self._send(stage_id, ("add", token, requests))
        return token

    def _wait_reply(self, token: int) -> Any:
        """The stage's reply to ``token`` (call with the lock held); routes meanwhile unless a background
        thread does."""
        self._waited.add(token)
        try:
            while token not in self._replies:
                self._raise_if_dead()
                if self._pump is not None:
                    self._replied.wait(LIVENESS_SECONDS)
                elif (message := self._receive(LIVENESS_SECONDS)) is not None:
                    self._route(message)
            return self._replies.pop(token)
        finally:
            self._waited.discard(token)

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < len(self.stages):
            self._raise_if_dead()
            try:
                message = loads(self.outbox.get(timeout=LIVENESS_SECONDS))
            except queue.Empty:
                self._check_alive()
                continue
            if message[0] == "ready":
                ready.add(message[1])
            elif message[0] == "start_failed":
                raise OmniStageError(f"{_name(self.stages[message[1]])} failed to start:\n{message[2]}")

    def _check_alive(self) -> None:
        now = time.monotonic()
        if self.dead is not None or now - self._last_check < LIVENESS_SECONDS:
            return
        self._last_check = now
        for stage, handle in zip(self.stages, self.handles, strict=False):
            if not handle.is_alive():
                self._on_dead(stage.stage_id, handle.exit_description())
                return

    def _on_dead(self, stage_id: int, how: str) -> None:
        if self.dead is None:
            self.dead = OmniStageError(f"{_name(self.stages[stage_id])} {how}")
        for request in list(self.requests.values()):
            self._finish(request, error=str(self.dead))
        self.requests.clear()

    def _raise_if_dead(self) -> None:
        self._check_alive()
        if self.dead is not None:
            raise self.dead


def check_pipeline(stages: list[OmniStageConfig]) -> None:
    """Stage ids are positions; each default hand-off has a source that makes what it needs."""
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    for position, stage in enumerate(stages):
        if stage.stage_id != position:
            where = f"stage {stage.stage_id}"
            raise ValueError(f"{where}: stage_id must equal its position in the list ({position})")
        if stage.source_stage is None or stage.stage_input is not None:
            continue  # the first stage, or a user's own stage-input function
        source = stages[stage.source_stage]
        name = default_stage_input(stage, source)
        need_engine, need_output = {"text": ("ar", "text"), "hidden_states": ("ar", "hidden_states"),
                                    "image": ("dit", "image")}[name]  # fmt: skip
        if source.engine_type != need_engine or need_output not in source.output_modalities:
            raise ValueError(
                f"stage {stage.stage_id}: input {stage.input_modalities} needs stage {source.stage_id} to be "
                f"an {need_engine!r} stage with {need_output!r} in output_modalities (or set stage_input)"
            )
        if name == "hidden_states" and stage.engine_type != "dit":
            where = f"stage {stage.stage_id}"
            raise ValueError(f"{where}: hidden_states input is for 'dit' stages (prompt_embeds)")


def _name(stage: OmniStageConfig) -> str:
    return f"stage {stage.stage_id} ({stage.engine_type})"


def _stage_input_fn(stages: list[OmniStageConfig], stage: OmniStageConfig) -> Any:
    source = stages[stage.source_stage] if stage.source_stage is not None else None
    name = stage.stage_input or default_stage_input(stage, source)
    try:
        return get_stage_input(name)
    except ValueError as error:
        raise ValueError(f"stage {stage.stage_id}: {error}") from None


def _stop_all(handles: list[Any], inboxes: list[Any], prefix: str) -> None:
    for handle, inbox in zip(handles, inboxes, strict=False):
        if handle.is_alive():
            inbox.put(dumps(("shutdown",)))
    for handle in handles:
        handle.stop(STOP_TIMEOUT_SECONDS)
    sweep(prefix)
