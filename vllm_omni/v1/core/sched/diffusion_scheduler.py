"""Step-level continuous batching for diffusion requests.

The unit of work is one denoising step of every running request. Between steps, finished requests leave
the running batch and waiting requests join it (FCFS), so a request never waits for a whole batch of
images to finish. With a memory budget, a request joins only while the running batch's working-memory
estimates and its own stay within it (FCFS: a request that does not fit yet waits for room, and the ones
behind it wait too). Requests whose batch keys match share a transformer forward pass; the scheduler hands
the runner one group per key.

The scheduler owns the requests' lifecycle, as vLLM's does: every request that finished, failed or was
aborted is recorded here and handed to the runner once, in a scheduler output's ``finished_req_ids``, which
is where the runner frees its state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_omni.diffusion.limits import DiTLimits
from vllm_omni.diffusion.memory import check_fits
from vllm_omni.diffusion.request import DiffusionRequest


@dataclass
class DiffusionSchedulerOutput:
    """What the runner does in one engine step."""

    new_requests: list[DiffusionRequest] = field(default_factory=list)
    """Requests joining the running batch: encode, draw noise, set up their sampler."""
    groups: list[list[str]] = field(default_factory=list)
    """Request ids of the running batch, one list per forward pass (same batch key)."""
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests that ended (finished, failed or aborted) since the last output: the runner frees them."""


class OmniDiffusionScheduler:
    """Running batch and waiting queue of diffusion requests, bounded by the stage's ``DiTLimits`` and,
    when given, a memory budget (``DiTConfig.memory_budget``)."""

    def __init__(
        self,
        limits: DiTLimits,
        memory_budget: int | None = None,
        request_bytes: Callable[[DiffusionRequest], int] | None = None,
    ) -> None:
        """``request_bytes``: a request's working-memory estimate (required with ``memory_budget``)."""
        if memory_budget is not None and request_bytes is None:
            raise ValueError("a memory budget needs the requests' working-memory estimate (request_bytes)")
        self.limits = limits
        self.memory_budget, self.request_bytes = memory_budget, request_bytes
        self.running_bytes = 0
        """The working-memory estimates of the running batch, summed (0 without a budget)."""
        self.waiting: deque[DiffusionRequest] = deque()
        self.running: dict[str, DiffusionRequest] = {}
        self.finished_req_ids: set[str] = set()
        """Ended since the last scheduler output (their runner state is still to be freed)."""

    def add_request(self, request: DiffusionRequest) -> None:
        """Queue ``request``; refuses it (ValueError) when the stage is full, the id is taken or it alone is
        over the memory budget."""
        request_id = request.request_id
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.limits.check_room(len(self.running) + len(self.waiting))
        if self.memory_budget is not None:
            check_fits(self._bytes_of(request), self.memory_budget, request.height, request.width)
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str]) -> list[str]:
        """End these requests wherever they are (finished, failed or aborted); returns the ids that were
        waiting or running. They reach the runner in the next output's ``finished_req_ids``."""
        ids = set(request_ids)
        ended = [r.request_id for r in self.waiting if r.request_id in ids]
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
        for request_id in request_ids:
            if (request := self.running.pop(request_id, None)) is not None:
                ended.append(request_id)
                self.running_bytes -= self._bytes_of(request)
        self.finished_req_ids.update(ended)
        return ended

    def schedule(self) -> DiffusionSchedulerOutput:
        """Admit waiting requests up to the batch bound and group the running batch by batch key."""
        new = []
        while self.waiting and len(self.running) < self.limits.max_batch_size and self._fits(self.waiting[0]):
            request = self.waiting.popleft()
            self.running[request.request_id] = request
            self.running_bytes += self._bytes_of(request)
            new.append(request)
        groups: dict[Any, list[str]] = {}
        for request in self.running.values():
            groups.setdefault(request.batch_key, []).append(request.request_id)
        return DiffusionSchedulerOutput(new, list(groups.values()), self._take_finished())

    def _fits(self, request: DiffusionRequest) -> bool:
        return (
            self.memory_budget is None or self.running_bytes + self._bytes_of(request) <= self.memory_budget
        )

    def _bytes_of(self, request: DiffusionRequest) -> int:
        return 0 if self.memory_budget is None else self.request_bytes(request)

    def schedule_frees(self) -> DiffusionSchedulerOutput:
        """An output that only frees the requests ended since the last one (e.g. right after an abort)."""
        return DiffusionSchedulerOutput(finished_req_ids=self._take_finished())

    def _take_finished(self) -> set[str]:
        finished, self.finished_req_ids = self.finished_req_ids, set()
        return finished

    def has_unfinished_requests(self) -> bool:
        """Requests are waiting or running."""
        return bool(self.waiting or self.running)

    def has_requests(self) -> bool:
        """Unfinished requests, or ended ones whose runner state is not freed yet (one more step frees it)."""
        return self.has_unfinished_requests() or bool(self.finished_req_ids)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)
