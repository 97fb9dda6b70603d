"""``GET /metrics`` of the omni server: Prometheus text format, collected at scrape time.

Three sources, named the way vLLM names its own (``vllm:`` there, ``vllm_omni:`` here):

- the server process: generation requests by endpoint and outcome, their latency, rejected requests
  (:class:`RequestMetricsMiddleware`, a pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would hide
  a client's disconnect from the route, which must abort the request);
- every stage replica: its ``StageMetrics`` (one ``GetMetrics`` round trip per replica per scrape): running
  batch, queue depth, step latency, failed requests, a dit stage's conditioning cache; labels ``stage``,
  ``kind``, ``replica``;
- every ``ar`` stage whose engine logs stats: vLLM's own ``vllm:*`` metrics of that engine, recorded by
  vLLM in the stage's process, with ``stage`` and ``replica`` labels added (:func:`merge_families`).
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.async_omni_llm import AsyncOmniLLM
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.pipeline.stage_metrics import StageMetrics, StepHistogram

GENERATION_ENDPOINTS = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
)
"""The endpoints whose requests are counted (those of them the app serves)."""
OUTCOMES = ("ok", "4xx", "5xx", "aborted")
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
"""vLLM's buckets of ``vllm:e2e_request_latency_seconds``."""
STAGE_LABELS = ["stage", "kind", "replica"]


class ServerMetrics:
    """The server's own metrics (a registry of their own); every series exists from the start, at 0."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.endpoints = frozenset(endpoints)
        """The endpoints counted."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vllm_omni:requests",
            "Generation requests answered, by endpoint and outcome (ok, 4xx, 5xx, aborted: the client went "
            "away first).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vllm_omni:e2e_request_latency_seconds",
            "Seconds from a request's arrival to the last byte of its response, requests with outcome ok.",
            ["endpoint"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "vllm_omni:requests_rejected",
            "Generation requests refused with 429 (--max-queued-requests or a stage queue full); also "
            "counted as 4xx.",
            ["endpoint"],
            registry=self.registry,
        )
        for endpoint in self.endpoints:
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)
            self.latency.labels(endpoint)
            self.rejected.labels(endpoint)

    def record(self, endpoint: str, status: int | None, outcome: str, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, outcome).inc()
        if outcome == "ok":
            self.latency.labels(endpoint).observe(seconds)
        if status == 429:
            self.rejected.labels(endpoint).inc()


class _Exchange:
    """What a middleware sees of one request: the status sent, whether the response ended, whether the client
    went away, whether a stream sent an error event."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.complete = self.client_gone = self.stream_failed = False

    def outcome(self) -> str:
        if self.client_gone or self.status == 499:  # 499: the route's answer to a client that went away
            return "aborted"
        if not self.complete or self.status >= 500 or self.stream_failed:
            return "5xx"
        return "4xx" if self.status >= 400 else "ok"


class RequestMetricsMiddleware:
    """Counts each request to a counted endpoint once it is answered (or abandoned). It passes messages
    through unchanged, so routes still see the client's disconnect."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.metrics.endpoints:
            await self.app(scope, receive, send)
            return
        exchange, start = _Exchange(), time.perf_counter()

        async def receive_and_watch() -> dict:
            message = await receive()
            exchange.client_gone |= message["type"] == "http.disconnect"
            return message

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            elif message["type"] == "http.response.body":
                exchange.stream_failed |= message.get("body", b"").startswith(b"event: error\n")
                exchange.complete = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.record(scope["path"], exchange.status, exchange.outcome(), elapsed)


def add_request_metrics(app: FastAPI) -> None:
    """Count the requests of the generation endpoints ``app`` serves (call once its routes are added);
    the metrics are ``app.state.metrics``."""
    served = {getattr(route, "path", None) for route in app.routes}
    app.state.metrics = ServerMetrics([path for path in GENERATION_ENDPOINTS if path in served])
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)


async def metrics_response(omni: AsyncOmniLLM, metrics: ServerMetrics) -> Response:
    """The ``/metrics`` response: the server's, every stage replica's and vLLM's own metrics. Replicas that
    ended, and every stage of a pipeline that is dead, report nothing (``/health`` says why)."""
    replicas = [(stage, replica) for stage in omni.stages for replica in range(stage.replicas)]
    reported = await asyncio.gather(*(_stage_metrics(omni, stage.stage_id, r) for stage, r in replicas))
    live = [(stage, r, m) for (stage, r), m in zip(replicas, reported, strict=True) if m is not None]
    vllm_texts = [({"stage": str(stage.stage_id), "replica": str(r)}, m.vllm_metrics)
                  for stage, r, m in live if m.vllm_metrics]  # fmt: skip
    families = [*metrics.registry.collect(), *stage_families(live), *merge_families(vllm_texts)]
    body = generate_latest(types.SimpleNamespace(collect=lambda: families))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _stage_metrics(omni: AsyncOmniLLM, stage_id: int, replica: int) -> StageMetrics | None:
    try:
        return await omni.stage_metrics(stage_id, replica)
    except OmniStageError:
        return None


def stage_families(stages: Iterable[tuple[OmniStageConfig, int, StageMetrics]]) -> list[Metric]:
    """The per-replica metric families (labels ``stage``, ``kind``, ``replica``) of ``(stage, replica,
    metrics)``; a value the replica does not know (None) has no sample."""
    running = GaugeMetricFamily(
        "vllm_omni:stage_num_requests_running",
        "Requests in the stage engine's running batch.",
        labels=STAGE_LABELS,
    )
    waiting = GaugeMetricFamily(
        "vllm_omni:stage_num_requests_waiting",
        "Requests queued in the stage engine, not running yet (queue depth).",
        labels=STAGE_LABELS,
    )
    steps = HistogramMetricFamily(
        "vllm_omni:stage_step_seconds", "Seconds per engine step of the stage.", labels=STAGE_LABELS
    )
    failed = CounterMetricFamily(
        "vllm_omni:stage_failed_requests",
        "Requests that failed in the stage (engine errors; not aborts).",
        labels=STAGE_LABELS,
    )
    queries = CounterMetricFamily(
        "vllm_omni:conditioning_cache_queries",
        "Lookups of a dit stage's conditioning cache (prompt encodings; native engine).",
        labels=STAGE_LABELS,
    )
    hits = CounterMetricFamily(
        "vllm_omni:conditioning_cache_hits",
        "Conditioning-cache lookups that found the encoding (the text encoder did not run).",
        labels=STAGE_LABELS,
    )
    for stage, replica, m in stages:
        labels = [str(stage.stage_id), stage.engine_type, str(replica)]
        values = [(running, m.num_running), (waiting, m.num_waiting), (failed, m.num_failed_requests),
                  (queries, m.conditioning_cache_queries), (hits, m.conditioning_cache_hits)]  # fmt: skip
        for family, value in values:
            if value is not None:
                family.add_metric(labels, value)
        steps.add_metric(labels, _cumulative(m.step_seconds), m.step_seconds.sum)
    return [running, waiting, steps, failed, queries, hits]


def _cumulative(histogram: StepHistogram) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` bound, steps at most that long) of ``histogram``."""
    bounds = [*map(floatToGoString, histogram.buckets), "+Inf"]
    total, buckets = 0, []
    for bound, count in zip(bounds, histogram.counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def merge_families(sources: Iterable[tuple[dict[str, str], str]]) -> list[Metric]:
    """The metric families of several Prometheus texts as one list: each source's ``labels`` added to each
    of its samples, one family per name (HELP and TYPE from the first source that has it)."""
    merged: dict[str, Metric] = {}
    for labels, text in sources:
        for family in text_string_to_metric_families(text):
            samples = [sample._replace(labels={**sample.labels, **labels}) for sample in family.samples]
            if family.name in merged:
                merged[family.name].samples.extend(samples)
            else:
                family.samples = samples
                merged[family.name] = family
    return list(merged.values())
