"""Step-level continuous batching for diffusion requests.

The unit of work is one denoising step of every running request. Between steps, finished requests leave
the running batch and waiting requests join it (FCFS), so a request never waits for a whole batch of
images to finish. Requests whose batch keys match share a transformer forward pass; the scheduler hands
the runner one group per key.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vllm_omni.diffusion.request import DiffusionRequest


@dataclass
class DiffusionSchedulerOutput:
    """What the runner does in one engine step."""

    new_requests: list[DiffusionRequest] = field(default_factory=list)
    """Requests joining the running batch: encode, draw noise, set up their sampler."""
    groups: list[list[str]] = field(default_factory=list)
    """Request ids of the running batch, one list per forward pass (same batch key)."""
    freed_request_ids: list[str] = field(default_factory=list)
    """Aborted requests whose runner state must be released."""

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.groups or self.freed_request_ids)


class OmniDiffusionScheduler:
    """Bounded running batch and waiting queue of diffusion requests."""

    def __init__(self, max_batch_size: int, max_waiting_requests: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_waiting_requests = max_waiting_requests
        self.waiting: deque[DiffusionRequest] = deque()
        self.running: dict[str, DiffusionRequest] = {}
        self._freed: list[str] = []

    def add_request(self, request: DiffusionRequest) -> None:
        """Queue ``request``; refuses it (ValueError) when the waiting queue is full or the id is taken."""
        request_id = request.request_id
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if len(self.waiting) >= self.max_waiting_requests:
            raise ValueError(
                f"the waiting queue is full ({self.max_waiting_requests} requests, "
                "DiTConfig.max_waiting_requests); retry later"
            )
        self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Drop these requests wherever they are; returns the ids that were known."""
        ids = set(request_ids)
        aborted = [r.request_id for r in self.waiting if r.request_id in ids]
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
        for request_id in ids & self.running.keys():
            del self.running[request_id]
            self._freed.append(request_id)
            aborted.append(request_id)
        return aborted

    def schedule(self) -> DiffusionSchedulerOutput:
        """Admit waiting requests up to the batch bound and group the running batch by batch key."""
        new = []
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting.popleft()
            self.running[request.request_id] = request
            new.append(request)
        groups: dict[Any, list[str]] = {}
        for request in self.running.values():
            groups.setdefault(request.batch_key, []).append(request.request_id)
        freed, self._freed = self._freed, []
        return DiffusionSchedulerOutput(new, list(groups.values()), freed)

    def finish_requests(self, request_ids: list[str]) -> None:
        """Remove finished (or failed) requests from the running batch."""
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)
