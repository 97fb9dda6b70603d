"""``GET /metrics`` of ``vllm serve --omni``: exact counts after known traffic on the tiny SD3 (ok, 400, 429,
a client that hangs up), vLLM's own metrics of an ar stage with a stage label (tiny Qwen3), and the pieces
without a server (merging several stages' texts, outcomes of the request middleware)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import types

import pytest
import requests
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.utils import running_server
from vllm_omni.entrypoints.openai.metrics import RequestMetricsMiddleware, ServerMetrics, merge_families
from vllm_omni.pipeline.stage_metrics import StepHistogram
from vllm_omni.testing.tiny_models import tiny_model_path

KEY = {"Authorization": "Bearer sesame"}
IMAGES, GENERATE = "/v1/images/generations", "/generate"


def scrape(url: str) -> tuple[str, dict]:
    """The /metrics text, and each sample's value by (name, frozenset of its labels)."""
    response = requests.get(f"{url}/metrics", headers=KEY, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return response.text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels``."""
    (found,) = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return found


def wait_for(url: str, condition, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(samples := scrape(url)[1]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return samples


def test_counts_after_known_traffic():
    args = "--omni --dit-steps 2 --dit-size 32x32 --max-queued-requests 1 --api-key sesame".split()
    with running_server(tiny_model_path("sd3"), *args) as url:
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401  # --api-key guards it too
        stage = {"stage": "0", "kind": "dit"}
        with socket.create_connection(_address(url)) as client:  # held by the server, then abandoned
            body = json.dumps({"prompt": "slow", "params": {"0": {"num_inference_steps": 20_000}}}).encode()
            head = f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            client.sendall(head.encode() + body)
            wait_for(url, lambda s: value(s, "vllm_omni:stage_num_requests_running", **stage) == 1)
            full = requests.post(f"{url}{IMAGES}", json={"prompt": "x"}, headers=KEY, timeout=60)
            assert full.status_code == 429
        bad = requests.post(f"{url}{IMAGES}", json={"prompt": "x", "size": "30x32"}, headers=KEY, timeout=60)
        assert bad.status_code == 400
        wait_for(
            url, lambda s: value(s, "vllm_omni:requests_total", endpoint=GENERATE, outcome="aborted") == 1
        )
        for _ in range(2):
            ok = requests.post(f"{url}{IMAGES}", json={"prompt": "a red sunset"}, headers=KEY, timeout=60)
            assert ok.status_code == 200
        text, samples = scrape(url)
    requests_by = {(e, o): value(samples, "vllm_omni:requests_total", endpoint=e, outcome=o)
                   for e in (IMAGES, GENERATE) for o in ("ok", "4xx", "5xx", "aborted")}  # fmt: skip
    assert requests_by == {(IMAGES, "ok"): 2, (IMAGES, "4xx"): 2, (IMAGES, "5xx"): 0, (IMAGES, "aborted"): 0,
                           (GENERATE, "ok"): 0, (GENERATE, "4xx"): 0, (GENERATE, "5xx"): 0,
                           (GENERATE, "aborted"): 1}  # fmt: skip
    assert value(samples, "vllm_omni:requests_rejected_total", endpoint=IMAGES) == 1
    assert value(samples, "vllm_omni:requests_rejected_total", endpoint=GENERATE) == 0
    assert value(samples, "vllm_omni:e2e_request_latency_seconds_count", endpoint=IMAGES) == 2
    assert value(samples, "vllm_omni:e2e_request_latency_seconds_count", endpoint=GENERATE) == 0
    assert value(samples, "vllm_omni:e2e_request_latency_seconds_sum", endpoint=IMAGES) > 0
    steps = value(samples, "vllm_omni:stage_step_seconds_count", **stage)
    assert steps > 0 and value(samples, "vllm_omni:stage_step_seconds_bucket", le="+Inf", **stage) == steps
    assert value(samples, "vllm_omni:stage_step_seconds_sum", **stage) > 0
    assert value(samples, "vllm_omni:stage_num_requests_waiting", **stage) == 0
    assert value(samples, "vllm_omni:stage_num_requests_running", **stage) == 0
    assert value(samples, "vllm_omni:stage_failed_requests_total", **stage) == 0
    # guided SD3 encodes prompt and negative prompt: "slow" and "" miss, "a red sunset" misses once
    assert value(samples, "vllm_omni:conditioning_cache_queries_total", **stage) == 6
    assert value(samples, "vllm_omni:conditioning_cache_hits_total", **stage) == 3
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(typed) == len(set(typed))  # one HELP/TYPE per family


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.engine
def test_an_ar_stage_reports_vllms_own_metrics_with_its_stage():
    with running_server(tiny_model_path("qwen3"), "--omni", "--dtype", "float32") as url:
        greedy = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
        out = requests.post(f"{url}/generate", json={"prompt": "hello", "params": {"0": greedy}}, timeout=120)
        assert out.status_code == 200
        _, samples = scrape(url)
    assert value(samples, "vllm:request_success_total", stage="0", finished_reason="length") == 1
    assert value(samples, "vllm:generation_tokens_total", stage="0") == 4
    assert value(samples, "vllm:time_to_first_token_seconds_count", stage="0") == 1
    assert value(samples, "vllm:num_requests_running", stage="0") == 0
    stage = {"stage": "0", "kind": "ar"}
    assert value(samples, "vllm_omni:stage_num_requests_running", **stage) == 0
    assert value(samples, "vllm_omni:stage_step_seconds_count", **stage) >= 4  # a step per token at least
    assert value(samples, "vllm_omni:requests_total", endpoint=GENERATE, outcome="ok") == 1
    assert not any(name.startswith("vllm_omni:conditioning_cache") for name, _ in samples)  # no such cache


def _vllm_like_text(tokens: int) -> str:
    """What an ar stage sends: vLLM-style families (a counter, a histogram named *_total) of its registry."""
    registry = CollectorRegistry()
    Counter("vllm:generation_tokens", "Generation tokens.", ["engine"], registry=registry).labels("0").inc(
        tokens
    )
    histogram = Histogram("vllm:iteration_tokens_total", "Tokens per step.", ["engine"], buckets=(1, 8),
                          registry=registry)  # fmt: skip
    histogram.labels("0").observe(tokens)
    return generate_latest(registry).decode()


def test_merging_stage_texts_gives_one_family_per_name_with_a_stage_label():
    families = merge_families([({"stage": "0"}, _vllm_like_text(3)), ({"stage": "2"}, _vllm_like_text(5))])
    text = generate_latest(types.SimpleNamespace(collect=lambda: families)).decode()
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    helped = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert len(typed) == len(set(typed)) == len(helped) == len(set(helped))
    assert "vllm:generation_tokens_total" in typed and "vllm:iteration_tokens_total" in typed
    parsed = {(s.name, s.labels.get("stage"), s.labels.get("le")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert parsed["vllm:generation_tokens_total", "0", None] == 3
    assert parsed["vllm:generation_tokens_total", "2", None] == 5
    assert parsed["vllm:iteration_tokens_total_bucket", "0", "8.0"] == 1
    assert parsed["vllm:iteration_tokens_total_bucket", "2", "1.0"] == 0
    assert parsed["vllm:iteration_tokens_total_sum", "2", None] == 5


def test_step_histogram_buckets_are_upper_bounds():
    histogram = StepHistogram(buckets=(0.1, 1.0))
    for seconds in (0.1, 0.5, 1.0, 3.0):
        histogram.observe(seconds)
    assert histogram.counts == [1, 2, 1] and histogram.count == 4 and histogram.sum == pytest.approx(4.6)


@pytest.mark.parametrize(
    ("status", "bodies", "disconnect", "outcome"),
    [
        (200, [b"{}"], False, "ok"),
        (429, [b"{}"], False, "4xx"),
        (503, [b"{}"], False, "5xx"),
        (200, [b"event: image_generation.partial_image\n", b"event: error\ndata: {}\n\n"], False, "5xx"),
        (499, [b"{}"], False, "aborted"),  # the route's answer to a client that went away
        (None, [], True, "aborted"),  # the route saw the client go away and answered nothing
        (None, [], False, "5xx"),  # the route raised: the server's error middleware answers 500
    ],
)
def test_request_outcomes(status, bodies, disconnect, outcome):
    metrics = ServerMetrics([GENERATE])

    async def app(scope, receive, send):
        if disconnect:
            assert (await receive())["type"] == "http.disconnect"  # seen by the route through the middleware
            raise asyncio.CancelledError
        if status is None:
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": status, "headers": []})
        for body in bodies:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    middleware = RequestMetricsMiddleware(app, metrics)
    with (
        pytest.raises((asyncio.CancelledError, RuntimeError)) if status is None else contextlib.nullcontext()
    ):
        asyncio.run(middleware(_scope(GENERATE), receive, send))
    samples = {
        (s.name, s.labels.get("outcome")): s.value for f in metrics.registry.collect() for s in f.samples
    }
    assert {o: samples["vllm_omni:requests_total", o] for o in ("ok", "4xx", "5xx", "aborted")} == {
        o: float(o == outcome) for o in ("ok", "4xx", "5xx", "aborted")
    }
    assert samples["vllm_omni:requests_rejected_total", None] == float(status == 429)
    assert samples["vllm_omni:e2e_request_latency_seconds_count", None] == float(outcome == "ok")


def _scope(path: str) -> dict:
    return {"type": "http", "path": path, "method": "POST", "headers": []}
