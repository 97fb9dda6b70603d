"""StageManager: one engine per stage, each in its own process; requests flow from stage to stage.

The manager starts every stage through a launcher (local processes by default) and learns each stage's
limits when it is ready. A request's params are checked against every stage's limits, and the pipeline's
queue bounds, before the first stage gets it: a request a later stage would refuse costs no compute. When a
stage finishes a request, the manager calls the next stage's stage-input function (outside its lock) and
sends the result on; tensors pass through by their handle (shared memory, Ray's object store), never
copied here. Stages work on different requests at once. A stage with replicas gets each request on the
replica with the fewest requests in it. A replica that dies fails the requests in it with an error naming
it; the others keep serving, and when a stage has no replica left, every pending request fails and the
pipeline is dead. ``shutdown`` stops every process.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.kinds import get_stage_kind
from vllm_omni.pipeline.launcher import StageLauncher
from vllm_omni.pipeline.memory_plan import plan_memory
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import (
    AbortRequests,
    AddRequests,
    ExtendRequest,
    GetMetrics,
    GetStats,
    StageMessageType,
    StageOutput,
    StageRequest,
)
from vllm_omni.pipeline.running_stages import LIVENESS_SECONDS, OmniStageError, RunningStages
from vllm_omni.pipeline.stage_input import StageInput, check_pipeline, get_stage_input, stage_input_of
from vllm_omni.pipeline.stage_io import SHM_THRESHOLD_BYTES
from vllm_omni.pipeline.stage_metrics import StageMetrics

__all__ = ["OmniQueueFullError", "OmniStageError", "StageManager"]


class OmniQueueFullError(RuntimeError):
    """A stage's queue bound would be exceeded by the requests already in the pipeline; retry later."""


@dataclass
class _Request:
    params: list[Any]
    """The request's params object for each stage of its route: stages 0 to ``len(params) - 1`` (a request
    that wants none of the later stages' outputs ends early)."""
    result: OmniRequestOutput
    stage: int = 0
    """The stage serving the request now."""
    slot: int = -1
    """The replica (``RunningStages`` slot) serving it now."""
    hop_id: str = ""
    """The request's id in that stage (fresh per hop: a late output of an earlier hop never matches)."""
    outputs: dict[int, Any] = field(default_factory=dict)
    """Stage outputs still held: final ones, and non-final ones a later stage reads."""
    kept: list[Any] = field(default_factory=list)
    """What the codec kept of the last output to pass on to the next stage (shared-memory segments)."""
    fed: tuple[int, int, str] | None = None
    """(stage, slot, hop id) of the next stage while it takes the request's input as the current stage
    makes it (``takes_input_while_made``: an open request there); None otherwise."""

    def hops(self) -> list[tuple[int, str]]:
        """(slot, hop id) of every stage the request is in."""
        return [(self.slot, self.hop_id)] + ([self.fed[1:]] if self.fed is not None else [])


class StageManager:
    """Runs the stages of a pipeline and moves requests through them.

    One thread at a time polls (``poll``, or the background thread of ``start_background``); adds, aborts
    and stats may come from other threads.
    """

    def __init__(
        self,
        stages: Sequence[OmniStageConfig],
        launcher: StageLauncher | str | None = None,
        shm_threshold: int = SHM_THRESHOLD_BYTES,
        keep_stage_outputs: bool = False,
    ) -> None:
        """Divide each GPU that ``ar`` and ``dit`` stages share (``memory_plan``), start every stage (they
        load in parallel) and wait until all are ready.

        ``launcher``: ``"local"`` (the default: local processes), ``"ray"`` (Ray actors) or a launcher object
        (``vllm_omni.pipeline.launcher``). ``shm_threshold``: tensors of at least this many bytes travel
        outside the messages (shared memory; Ray's object store). ``keep_stage_outputs``: also return the
        outputs of non-final stages (debugging); by default they are freed once handed on.
        """
        self.stages = plan_memory(list(stages))
        check_pipeline(self.stages)
        self.kinds = [get_stage_kind(stage.engine_type) for stage in self.stages]
        self.stage_inputs = [get_stage_input(stage_input_of(self.stages, s)) for s in self.stages]
        self.keep_stage_outputs = keep_stage_outputs
        self._last_reader = {s.source_stage: s.stage_id for s in self.stages if s.source_stage is not None}
        self.requests: dict[str, _Request] = {}
        self.dead: OmniStageError | None = None
        """Why the pipeline stopped serving (a stage without a live replica, shutdown); None while serving."""
        self.dead_replicas: dict[int, OmniStageError] = {}
        """Slot -> why that replica ended, for the replicas that did (stage 0's replica 1 is slot 1 when
        stage 0 has several)."""
        self._hops: dict[str, str] = {}
        self._serial = count()
        self._updates: list[OmniRequestOutput] = []
        self._handoffs: collections.deque[tuple[_Request, int, bool]] = collections.deque()
        self._replies: dict[int, Any] = {}
        self._waited: set[int] = set()
        self._adds: dict[int, list[str]] = {}
        self._token_slots: dict[int, int] = {}
        self._lock = threading.RLock()
        self._replied = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._pump: threading.Thread | None = None
        self._deliver: Callable[[list[OmniRequestOutput]], None] | None = None
        self._last_check = 0.0
        self.running = RunningStages(self.stages, launcher, shm_threshold)
        """The stages' processes (handles, shared-memory prefix) and the limits they published."""

    # ---- requests ----------------------------------------------------------------------------------
    def add_requests(self, requests: list[tuple[str, Any, list[Any]]], wait: bool = True) -> None:
        """Send ``(request_id, prompt, params per stage)`` to the first stage (params for the stages of the
        request's route: all, or the first few when it ends early).

        Every stage's params are checked first (ValueError naming the stage and the field), and the
        stages' queue bounds (``OmniQueueFullError``); nothing runs for a refused batch. ``wait``: block
        until the first stage has validated the prompts (all or none are accepted; a rejection raises its
        error); otherwise a rejected request ends with an error update.
        """
        for _, _, params in requests:
            self.check_params(params)
        first = [self.stage_inputs[0](StageInput(prompt, {}, self.stages[0])) for _, prompt, _ in requests]
        with self._lock:
            self._raise_if_dead()
            ids = [request_id for request_id, _, _ in requests]
            taken = sorted(set(ids) & set(self.requests)) or sorted(_repeated(ids))
            if taken:
                raise ValueError(f"request id(s) {taken} already in the pipeline")
            self._check_capacity(len(requests))
            for request_id, prompt, params in requests:
                self.requests[request_id] = _Request(params, OmniRequestOutput(request_id, prompt))
            try:
                tokens = self._send_add(0, [self.requests[i] for i in ids], first, wait)
                errors = [error for token in tokens if (error := self._wait_reply(token))] if wait else []
            except BaseException:
                self._abort_added(ids)
                raise
            if errors:
                self._abort_added(ids)
                raise (ValueError if errors[0][0] == "ValueError" else OmniStageError)(
                    f"{self.stages[0].label}: {errors[0][1]}"
                )

    def check_params(self, params: list[Any]) -> None:
        """Refuse (ValueError naming the stage and the field) params one of the stages would refuse."""
        if not 1 <= len(params) <= len(self.stages):
            raise ValueError(f"params for 1 to {len(self.stages)} stages, got {len(params)}")
        route = zip(self.stages, self.kinds, self.running.limits, params, strict=False)  # params: the route's
        for stage, kind, limits, stage_params in route:
            try:
                kind.check_params(limits, stage_params)
            except ValueError as error:
                raise ValueError(f"{stage.label}: {error}") from None

    def free_slots(self) -> int | None:
        """How many more requests the pipeline takes now (the tightest stage queue bound); None: no bound."""
        with self._lock:
            slots = [bound - in_flight for _, bound, in_flight in self._queue_use()]
        return max(min(slots), 0) if slots else None

    def _abort_added(self, request_ids: list[str]) -> None:
        """Forget requests whose add failed; replicas that took some of them drop those."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and self.dead is None and request.slot not in self.dead_replicas:
                self._send(request.slot, AbortRequests([request.hop_id]))
        self._forget(request_ids)

    def _check_capacity(self, num_new: int) -> None:
        for stage_id, bound, in_flight in self._queue_use():
            if in_flight + num_new > bound:
                where = self.stages[stage_id].label
                raise OmniQueueFullError(
                    f"{where}: {in_flight} requests are in it or on their way to it and it queues at most "
                    f"{bound}; retry later"
                )

    def _queue_use(self) -> list[tuple[int, int, int]]:
        """(stage id, queue bound of its live replicas together, requests in it or before it) of every bounded
        stage."""
        use = []
        for stage_id, (kind, limits) in enumerate(zip(self.kinds, self.running.limits, strict=True)):
            bound = kind.queue_bound(limits)
            if bound is not None:
                bound *= len(self._live_slots(stage_id))
                use.append((stage_id, bound, sum(r.stage <= stage_id for r in self.requests.values())))
        return use

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests in whichever stage serves them; each ends with an ``aborted`` update."""
        with self._lock:
            for request_id in request_ids:
                request = self.requests.get(request_id)
                if request is not None:
                    self._end(request, error="aborted")

    def poll(self, timeout: float) -> list[OmniRequestOutput]:
        """Route what the stages sent and hand finished requests on, waiting up to ``timeout`` seconds for
        news; returns the snapshots of requests that progressed (finished ones with ``finished`` set)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            item = self.running.receive(min(LIVENESS_SECONDS, max(remaining, 0.0)))
            with self._lock:
                while item is not None:
                    self._route(*item)
                    item = self.running.receive(0.0)
                self._check_alive()
            self._run_handoffs()
            with self._lock:
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

    def stage_stats(self, stage_id: int, replica: int | None = None) -> dict[str, Any]:
        """What stage ``stage_id``'s engine holds (requests, bytes), after its next step: one replica's, or
        (``replica`` None) its live replicas' together (counts summed; ``replicas``: how many are live)."""
        if replica is not None:
            return self._ask(self._slot(stage_id, replica), GetStats)
        stats = [self._ask(slot, GetStats) for slot in self._live_slots(stage_id)]
        if self.stages[stage_id].replicas == 1:
            return stats[0]
        summed = {key: sum(s[key] for s in stats) if isinstance(value, int) else value
                  for key, value in stats[0].items()}  # fmt: skip
        return {**summed, "replicas": len(stats)}

    def stage_metrics(self, stage_id: int, replica: int = 0) -> StageMetrics:
        """A replica's metrics (batch, queue, step times, failures, caches), after its next step."""
        return self._ask(self._slot(stage_id, replica), GetMetrics)

    def _slot(self, stage_id: int, replica: int) -> int:
        slots = self.running.slots_of(stage_id)
        if not 0 <= replica < len(slots):
            raise ValueError(f"{self.stages[stage_id].label} has {len(slots)} replica(s), not {replica + 1}")
        return slots[replica]

    def _live_slots(self, stage_id: int) -> list[int]:
        return [slot for slot in self.running.slots_of(stage_id) if slot not in self.dead_replicas]

    def _ask(self, slot: int, message_type: type[GetStats | GetMetrics]) -> Any:
        with self._lock:
            self._raise_if_dead()
            if slot in self.dead_replicas:
                raise self.dead_replicas[slot]
            token = next(self._serial)
            self._waited.add(token)
            self._token_slots[token] = slot
            self._send(slot, message_type(token))
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
        self.running.stop()

    # ---- routing -----------------------------------------------------------------------------------
    def _route(self, slot: int, message: Any) -> None:
        if message is None:  # the replica's end of the channel closed
            self._replica_ended(slot)
            return
        if message.type is StageMessageType.OUTPUTS:
            for output in message.outputs:
                self._on_output(self.running.slots[slot][0], output)
        elif message.type is StageMessageType.REPLY:
            self._on_reply(slot, message.token, message.error or message.value)
        elif message.type is StageMessageType.FAILED:
            self._replica_ended(slot, f"failed:\n{message.error}")

    def _replica_ended(self, slot: int, what: str | None = None) -> None:
        """A replica died or its engine failed: its requests fail; the pipeline too if its stage has no
        replica left."""
        if slot in self.dead_replicas:
            return
        error = self.dead_replicas[slot] = self.running.error(slot, what)
        for token in [t for t, s in self._token_slots.items() if s == slot and t in self._waited]:
            self._replies[token] = error
        self._replied.notify_all()
        if not self._live_slots(self.running.slots[slot][0]):
            self._fail_all(error)
            return
        for request in [r for r in self.requests.values() if slot in dict(r.hops())]:
            self._end(request, error=str(error))

    def _on_output(self, stage_id: int, news: StageOutput) -> None:
        request = self.requests.get(self._hops.get(news.request_id, ""))
        if request is None:  # aborted or failed meanwhile: drop it (and free its segments)
            self.running.codec.loads(news.payload)
            return
        stage, last = self.stages[stage_id], stage_id == len(request.params) - 1  # its route's last stage
        hands_on = news.finished and news.error is None and not last
        kept: list[str] = []
        output = self.running.codec.loads(news.payload, keep=kept if hands_on else None)
        request.outputs[stage_id] = output
        if stage.final_output or self.keep_stage_outputs:
            request.result.stage_outputs[stage_id] = output
        if stage.final_output:
            self.kinds[stage_id].merge_output(request.result, output)
        if news.error:
            self._end(request, error=f"{stage.label}: {news.error}")
        elif news.finished and last:
            self._end(request, stage_id=stage_id)
        else:
            if stage.final_output:
                self._snapshot(request, stage_id)
            if hands_on:
                request.kept = kept
                self._handoffs.append((request, stage_id + 1, True))
            elif not news.finished and not last and self._streams_into(request, stage_id):
                self._handoffs.append((request, stage_id + 1, False))

    def _streams_into(self, request: _Request, stage_id: int) -> bool:
        """Whether the stage after ``stage_id`` takes the request's output while it is made (it reads this
        stage and ``takes_input_while_made``; this stage then reports every step of the request)."""
        reader = self.stages[stage_id + 1]
        takes = self.kinds[stage_id + 1].takes_input_while_made(request.params[stage_id + 1])
        return reader.source_stage == stage_id and reader.final_output and takes

    def _run_handoffs(self) -> None:
        """Feed the requests that finished a stage to the next one; stage-input functions run unlocked."""
        while True:
            with self._lock:
                if not self._handoffs:
                    return
                request, stage_id, done = self._handoffs.popleft()
                hop_id = request.hop_id
                data = StageInput(request.result.prompt, dict(request.outputs), self.stages[stage_id])
            try:
                prompt, error = self.stage_inputs[stage_id](data), None
            except Exception as exc:
                prompt, error = None, f"{type(exc).__name__}: {exc}"
            with self._lock:
                if request.hop_id == hop_id and self.requests.get(request.result.request_id) is request:
                    self._hand_off(request, stage_id, prompt, error, done)

    def _hand_off(self, request: _Request, stage_id: int, prompt: Any, error: str | None, done: bool) -> None:
        """Send the request's input to ``stage_id``: the whole (``done``: the stage before finished), or the
        input so far to a stage that takes it while it is made (an open request, then its extensions)."""
        kept: list[str] = []
        if done:  # the segments the finished output keeps are this hand-off's (none for a partial one)
            kept, request.kept = request.kept, []
        forwarded: list[str] = []
        try:
            if error is not None:
                raise ValueError(error)
            if request.fed is not None:
                self._extend(request, prompt, done)
            else:
                self._send_add(stage_id, [request], [prompt], forwarded=forwarded, open=not done)
        except Exception as exc:
            message = error or f"{type(exc).__name__}: {exc}"
            self._end(request, error=f"{self.stages[stage_id].label}: stage input failed: {message}")
        finally:
            self.running.codec.release([name for name in kept if name not in forwarded])
        if not done:
            return
        for source, last_reader in self._last_reader.items():
            if last_reader <= stage_id and not self.stages[source].final_output:
                request.outputs.pop(source, None)  # handed on for good

    def _extend(self, request: _Request, prompt: Any, done: bool) -> None:
        """The open request's input so far to the stage it is fed to; once ``done``, that stage is the one
        serving it."""
        stage_id, slot, hop_id = request.fed
        self._send(slot, ExtendRequest(hop_id, prompt, done))
        if done:
            self._hops.pop(request.hop_id, None)
            request.stage, request.slot, request.hop_id, request.fed = stage_id, slot, hop_id, None

    def _on_reply(self, slot: int, token: int, value: Any) -> None:
        self._token_slots.pop(token, None)
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
                request.result.refused = value[0] == "ValueError"
                self._end(request, error=f"{self.running.label(slot)}: {value[0]}: {value[1]}")

    def _snapshot(self, request: _Request, stage_id: int) -> None:
        result = request.result
        outputs = dict(result.stage_outputs)
        self._updates.append(dataclasses.replace(result, stage_outputs=outputs, stage_id=stage_id))

    def _end(self, request: _Request, stage_id: int | None = None, error: str | None = None) -> None:
        """The request leaves the pipeline (done, failed or aborted: then every stage it is in drops it;
        the one it failed in has already)."""
        if error is not None and self.dead is None:
            for slot, hop_id in request.hops():
                if slot not in self.dead_replicas:
                    self._send(slot, AbortRequests([hop_id]))
        self._forget([request.result.request_id])
        self.running.codec.release(request.kept)
        result = request.result
        result.stage_id, result.finished, result.error = stage_id, True, error
        self._updates.append(result)

    def _take_updates(self) -> list[OmniRequestOutput]:
        updates, self._updates = self._updates, []
        return updates

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                for _, hop_id in request.hops():
                    self._hops.pop(hop_id, None)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _send(self, slot: int, message: Any, forwarded: list[str] | None = None) -> None:
        self.running.send(slot, message, forwarded)

    def _send_add(
        self,
        stage_id: int,
        requests: list[_Request],
        prompts: list[Any],
        wait: bool = False,
        forwarded: list[str] | None = None,
        open: bool = False,
    ) -> list[int]:
        """Send requests to ``stage_id`` under fresh hop ids, each to the live replica with the fewest
        requests in it; returns the tokens of the replicas' answers (one per replica sent to). ``open``:
        the prompts are the input so far; the requests stay where they are and are fed (``_Request.fed``)."""
        batches: dict[int, list[StageRequest]] = {}
        live = self._live_slots(stage_id)
        load = collections.Counter(r.slot for r in self.requests.values() if len(live) > 1)  # one: no choice
        for request, prompt in zip(requests, prompts, strict=True):
            slot = min(live, key=lambda s: (load[s], s))
            load[request.slot] -= 1
            load[slot] += 1
            hop_id = f"{request.result.request_id}#{next(self._serial)}"
            self._hops[hop_id] = request.result.request_id
            if open:
                request.fed = (stage_id, slot, hop_id)
            else:
                self._hops.pop(request.hop_id, None)
                request.stage, request.slot, request.hop_id = stage_id, slot, hop_id
            item = StageRequest(hop_id, prompt, request.params[stage_id], open)
            batches.setdefault(slot, []).append(item)
        tokens = []
        for slot, items in batches.items():
            token = next(self._serial)
            if wait:
                self._waited.add(token)
                self._token_slots[token] = slot
            else:
                self._adds[token] = [item.request_id for item in items]
            self._send(slot, AddRequests(token, items), forwarded)
            tokens.append(token)
        return tokens

    def _wait_reply(self, token: int) -> Any:
        """The replica's reply to ``token`` (call with the lock held); routes meanwhile unless a background
        thread does (hand-offs wait for the next ``poll``). Raises the replica's error if it ended."""
        try:
            while token not in self._replies:
                self._raise_if_dead()
                if self._pump is not None:
                    self._replied.wait(LIVENESS_SECONDS)
                elif (item := self.running.receive(LIVENESS_SECONDS)) is not None:
                    self._route(*item)
            reply = self._replies.pop(token)
            if isinstance(reply, OmniStageError):
                raise reply
            return reply
        finally:
            self._waited.discard(token)
            self._token_slots.pop(token, None)

    def _check_alive(self) -> None:
        now = time.monotonic()
        if self.dead is not None or now - self._last_check < LIVENESS_SECONDS:
            return
        self._last_check = now
        for slot in self.running.dead():
            self._replica_ended(slot)

    def _fail_all(self, error: OmniStageError) -> None:
        """Mark the pipeline dead (the first cause wins) and end every pending request with the cause."""
        self.dead = self.dead or error
        for request in list(self.requests.values()):
            self._end(request, error=str(self.dead))

    def _raise_if_dead(self) -> None:
        self._check_alive()
        if self.dead is not None:
            raise self.dead


def _repeated(ids: list[str]) -> set[str]:
    seen: set[str] = set()
    return {i for i in ids if i in seen or seen.add(i)}
