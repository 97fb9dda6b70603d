"""StageManager: one engine per stage, each in its own process; requests flow from stage to stage.

The manager starts every stage through a launcher (local processes by default), sends each request to
the first stage and, when a stage finishes it, calls the next stage's stage-input function and sends the
result on. Stages work on different requests at once (stage 0 on request i+1 while stage 1 is on
request i). Messages go through queues; large tensors through shared memory (``stage_io``). A stage
that dies fails every pending request with an error naming it; ``shutdown`` stops every process.
"""

from __future__ import annotations

import dataclasses
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
from vllm_omni.core.stage_io import SHM_THRESHOLD_BYTES, dumps, loads, new_segment_prefix, sweep

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
    hop_id: str = ""
    """The request's id in that stage (fresh per hop: a late output of an earlier hop never matches)."""


class StageManager:
    """Runs the stages of a pipeline and moves requests through them.

    One thread at a time polls (``poll``, or the background thread of ``start_background``); adds, aborts
    and stats may come from other threads.
    """

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
        self.threshold, self.prefix = shm_threshold, new_segment_prefix()
        launcher = launcher or LocalProcessLauncher()
        self.outbox = launcher.mp_context.Queue()
        self.inboxes = [launcher.mp_context.Queue() for _ in self.stages]
        self.handles: list[Any] = []
        self._finalizer = weakref.finalize(self, _stop_all, self.handles, self.inboxes, self.prefix)
        self.requests: dict[str, _Request] = {}
        self.dead: OmniStageError | None = None
        self._hops: dict[str, str] = {}
        self._serial = count()
        self._updates: list[OmniRequestOutput] = []
        self._replies: dict[int, Any] = {}
        self._waited: set[int] = set()
        self._adds: dict[int, list[str]] = {}
        self._lock = threading.RLock()
        self._replied = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._pump: threading.Thread | None = None
        self._deliver: Callable[[list[OmniRequestOutput]], None] | None = None
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
            taken = sorted(set(ids) & set(self.requests)) or sorted(_repeated(ids))
            if taken:
                raise ValueError(f"request id(s) {taken} already in the pipeline")
            first = [self._first_input(prompt) for _, prompt, _ in requests]
            for (request_id, prompt, params), _ in zip(requests, first, strict=True):
                self.requests[request_id] = _Request(params, OmniRequestOutput(request_id, prompt))
            try:
                token = self._send_add(0, [self.requests[i] for i in ids], first, wait)
                error = self._wait_reply(token) if wait else None
            except BaseException:
                self._forget(ids)
                raise
            if error is not None:
                self._forget(ids)
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
                self._hops.pop(request.hop_id, None)
                if self.dead is None:
                    self._send(request.stage, ("abort", [request.hop_id]))
                self._finish(request, error="aborted")

    def poll(self, timeout: float) -> list[OmniRequestOutput]:
        """Route what the stages sent, waiting up to ``timeout`` seconds for news; returns the snapshots
        of requests that progressed (finished ones with ``finished`` set)."""
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
                    return self._take_updates()

    def start_background(self, deliver: Callable[[list[OmniRequestOutput]], None]) -> None:
        """Poll in a thread of its own from now on, passing each batch of updates to ``deliver``."""
        self._deliver = deliver
        self._pump = threading.Thread(target=self._pump_loop, name="omni-stage-manager", daemon=True)
        self._pump.start()

    def _pump_loop(self) -> None:
        while not self._stopping.is_set() and self.dead is None:
            try:
                updates = self.poll(LIVENESS_SECONDS)
            except Exception as exc:  # never leave callers waiting on a thread that is gone
                with self._lock:
                    self._fail_all(OmniStageError(f"the stage manager failed: {type(exc).__name__}: {exc}"))
                    updates = self._take_updates()
            if updates:
                self._deliver(updates)

    def stage_stats(self, stage_id: int) -> dict[str, int]:
        """What stage ``stage_id``'s engine holds (requests, bytes)."""
        with self._lock:
            self._raise_if_dead()
            token = next(self._serial)
            self._send(stage_id, ("stats", token))
            return self._wait_reply(token)

    def shutdown(self) -> None:
        """Stop every stage process (and what they started); pending requests end with an error.
        Idempotent; also runs at exit."""
        self._stopping.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join()
        with self._lock:
            self._fail_all(OmniStageError("the pipeline is shut down"))
            updates = self._take_updates()
        if updates and self._deliver is not None:
            self._deliver(updates)
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
            for hop_id, output, finished in message[2]:
                self._on_output(stage_id, hop_id, output, finished)
        elif kind in ("added", "stats"):
            self._on_reply(stage_id, *message[2:])
        elif kind in ("error", "start_failed"):
            self._on_dead(stage_id, f"failed:\n{message[2]}")

    def _on_output(self, stage_id: int, hop_id: str, output: Any, finished: bool) -> None:
        request = self.requests.get(self._hops.get(hop_id, ""))
        if request is None:
            return  # aborted or failed meanwhile
        result = request.result
        result.stage_outputs[stage_id] = output
        stage = self.stages[stage_id]
        if stage.engine_type == "ar" and stage.final_output:
            result.text = output.outputs[0].text
        error = getattr(output, "error", None)
        if error:
            self._end(request, error=f"{_name(stage)}: {error}")
        elif not finished:
            self._snapshot(request, stage_id)
        elif stage_id == len(self.stages) - 1:
            self._end(request, stage_id=stage_id)
        else:
            self._snapshot(request, stage_id)
            self._hand_off(request, stage_id + 1)

    def _hand_off(self, request: _Request, stage_id: int) -> None:
        result = request.result
        data = StageInput(result.prompt, result.stage_outputs, self.stages[stage_id])
        try:
            prompt = self.stage_inputs[stage_id](data)
            self._send_add(stage_id, [request], [prompt])
        except Exception as exc:
            self._end(request, error=f"{_name(self.stages[stage_id])}: stage input failed: "
                                     f"{type(exc).__name__}: {exc}")  # fmt: skip

    def _on_reply(self, stage_id: int, token: int, value: Any) -> None:
        if token in self._waited:
            self._replies[token] = value
            self._replied.notify_all()
            return
        hop_ids = self._adds.pop(token, [])
        if value is None:  # accepted
            return
        for hop_id in hop_ids:
            request = self.requests.get(self._hops.get(hop_id, ""))
            if request is not None:
                self._end(request, error=f"{_name(self.stages[stage_id])}: {value[0]}: {value[1]}")

    def _snapshot(self, request: _Request, stage_id: int) -> None:
        result = request.result
        outputs = dict(result.stage_outputs)
        self._updates.append(dataclasses.replace(result, stage_outputs=outputs, stage_id=stage_id))

    def _end(self, request: _Request, stage_id: int | None = None, error: str | None = None) -> None:
        """The request leaves the pipeline (done or failed)."""
        self.requests.pop(request.result.request_id, None)
        self._hops.pop(request.hop_id, None)
        self._finish(request, stage_id, error)

    def _finish(self, request: _Request, stage_id: int | None = None, error: str | None = None) -> None:
        result = request.result
        result.stage_id, result.finished, result.error = stage_id, True, error
        for stage in self.stages:
            output = result.stage_outputs.get(stage.stage_id)
            if stage.engine_type == "dit" and stage.final_output and output is not None:
                result.images, result.latents = output.images, output.latents
        self._updates.append(result)

    def _take_updates(self) -> list[OmniRequestOutput]:
        updates, self._updates = self._updates, []
        return updates

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                self._hops.pop(request.hop_id, None)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _send(self, stage_id: int, message: tuple) -> None:
        self.inboxes[stage_id].put(dumps(message, self.threshold, self.prefix))

    def _send_add(
        self, stage_id: int, requests: list[_Request], prompts: list[Any], wait: bool = False
    ) -> int:
        """Send requests to ``stage_id`` under fresh hop ids; returns the token of the stage's answer."""
        items = []
        for request, prompt in zip(requests, prompts, strict=True):
            self._hops.pop(request.hop_id, None)
            request.stage, request.hop_id = stage_id, f"{request.result.request_id}#{next(self._serial)}"
            self._hops[request.hop_id] = request.result.request_id
            items.append((request.hop_id, prompt, request.params[stage_id]))
        token = next(self._serial)
        if wait:
            self._waited.add(token)
        else:
            self._adds[token] = [hop_id for hop_id, _, _ in items]
        self._send(stage_id, ("add", token, items))
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
        self._fail_all(OmniStageError(f"{_name(self.stages[stage_id])} {how}"))

    def _fail_all(self, error: OmniStageError) -> None:
        """Mark the pipeline dead (the first cause wins) and end every pending request with the cause."""
        self.dead = self.dead or error
        for request in list(self.requests.values()):
            self._end(request, error=str(self.dead))

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


def _repeated(ids: list[str]) -> set[str]:
    seen: set[str] = set()
    return {i for i in ids if i in seen or seen.add(i)}


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
        inbox.cancel_join_thread()  # a dead stage never reads: do not wait on its queue at exit
    for handle in handles:
        handle.stop(STOP_TIMEOUT_SECONDS)
    sweep(prefix)
