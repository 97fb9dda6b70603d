"""What a stage reports to a ``GetMetrics`` (the server's ``/metrics`` renders it, one round trip per stage).

Plain data, no Prometheus types, except the text of vLLM's own metrics, which vLLM itself records in an
``ar`` stage's process. The stage loop times every engine step (:class:`StepHistogram`) and counts failed
requests; the engine adds what only it knows (:meth:`StageEngine.metrics`).
"""

from __future__ import annotations

import bisect
import types
from dataclasses import dataclass, field

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Upper bounds (seconds) of the step-time buckets: from an AR decode step (ms) to a large DiT step (s)."""


@dataclass
class StepHistogram:
    """Engine step durations: how many fell in each bucket, and their sum."""

    buckets: tuple[float, ...] = STEP_SECONDS_BUCKETS
    """Upper bounds in seconds, increasing; one more bucket (+Inf) follows the last."""
    counts: list[int] = field(default_factory=list)
    """Steps per bucket (not cumulative): ``counts[i]`` took at most ``buckets[i]`` and more than the bound
    before it; the last entry counts those above every bound. Zeros by default."""
    sum: float = 0.0
    """Seconds of every step together."""

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float) -> None:
        """Count one step of ``seconds``."""
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """Steps observed."""
        return sum(self.counts)


@dataclass(frozen=True)
class StageMetrics:
    """One stage's metrics now. Counters count from the stage's start; None: the stage's engine does not
    know (e.g. an ``ar`` stage with vLLM's log stats off, the diffusers executor's cache)."""

    num_running: int | None = None
    """Requests in the engine's running batch."""
    num_waiting: int | None = None
    """Requests queued in the engine, not running yet (the stage's queue depth)."""
    step_seconds: StepHistogram = field(default_factory=StepHistogram)
    """How long each engine step took."""
    num_failed_requests: int = 0
    """Requests that failed in the stage (an engine error; not those aborted)."""
    conditioning_cache_queries: int | None = None
    """Lookups of a ``dit`` stage's conditioning cache (prompt encodings)."""
    conditioning_cache_hits: int | None = None
    """Those lookups that found the encoding (the text encoder did not run)."""
    vllm_metrics: str | None = None
    """An ``ar`` stage's vLLM metrics (``vllm:*``, Prometheus text format) when its engine logs stats."""


def collect_vllm_metrics() -> tuple[str, dict[str, float]]:
    """vLLM's metrics in this process's default Prometheus registry (where vLLM's ``PrometheusStatLogger``
    records them): their text, and the sum of each sample's values by sample name."""
    from prometheus_client import REGISTRY, generate_latest

    families = [family for family in REGISTRY.collect() if family.name.startswith("vllm:")]
    totals: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    text = generate_latest(types.SimpleNamespace(collect=lambda: families)).decode()
    return text, totals
