"""Reliability of `vllm serve MODEL --omni` on the tiny SD3: schema fuzzing of its OpenAPI document
(schemathesis), bad input on every endpoint, 200 concurrent image requests, admission bursts, and 500 clients
that go away mid-request."""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import io
import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import hypothesis
import numpy as np
import psutil
import pytest
import requests
import schemathesis
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

import vllm_omni.testing.echo_stage  # noqa: F401  (registers the echo kind)
from tests.utils import running_server
from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.async_omni_llm import AsyncOmniLLM
from vllm_omni.testing.tiny_models import tiny_model_path

DIT_FLAGS = ("--omni", "--dit-steps", "2", "--dit-size", "32x32")
FUZZ_EXAMPLES = 125
"""Examples per operation and generation mode (positive, negative)."""
FUZZ_CAPS = {"num_inference_steps": 2, "n": 2}
"""A valid generated request runs the DiT: these fields are capped so that fuzzing stays fast."""
IDLE = {"running": 0, "waiting": 0, "states": 0, "running_bytes": 0, "waiting_bytes": 0}
"""A DiT stage's stats with no request in it (what a request leaves behind when it is gone)."""
SLOW_STEPS = 20_000


@pytest.fixture(scope="module")
def servers():
    """Two servers, started together: 256 queued requests at most (most tests), and 4 (admission)."""
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(stack.enter_context, running_server(tiny_model_path("sd3"), *DIT_FLAGS,
                                                            "--max-queued-requests", str(bound)))
            for bound in (256, 4)
        ]  # fmt: skip
        yield [future.result() for future in starting]


@pytest.fixture(scope="module")
def url(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small_url(servers):
    return servers[1]


# ---- schema fuzzing ----------------------------------------------------------------------------------------
def test_schema_fuzzing_finds_no_server_error(url, record_property):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    num_cases: collections.Counter = collections.Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        with_body = bool(list(operation.body))  # no negative case of an operation that takes nothing
        for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][: 2 if with_body else 1]:
            _fuzz(url, operation, mode, num_cases)
    total = sum(num_cases.values())
    record_property("schemathesis_cases", total)
    print(f"schemathesis: {total} cases {dict(num_cases)}")
    assert set(num_cases) == {operation.label for operation in operations}, num_cases
    assert min(num_cases["POST /generate"], num_cases["POST /v1/images/generations"]) > FUZZ_EXAMPLES
    _assert_serves(url)


def _fuzz(url: str, operation, mode: GenerationMode, num_cases: collections.Counter) -> None:
    """Up to FUZZ_EXAMPLES cases of ``operation``, none answered with a 5xx."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode).map(_capped))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    def call(case):
        response = case.call(base_url=url, timeout=120)
        case.validate_response(response, checks=[not_a_server_error])
        num_cases[operation.label] += 1

    call()


def _capped(case):
    _cap(case.body)
    return case


def _cap(value) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in FUZZ_CAPS and type(item) in (int, float) and item > FUZZ_CAPS[key]:  # 1000.0 is 1000
                value[key] = FUZZ_CAPS[key]
            else:
                _cap(item)
    elif isinstance(value, list):
        for item in value:
            _cap(item)


# ---- bad input ---------------------------------------------------------------------------------------------
BIG = 50 * 2**20
"""An oversized body: over the server's 16 MiB limit for JSON."""
GENERATE, IMAGES = "/generate", "/v1/images/generations"


def dit(**params) -> dict:
    """A /generate body with these params for the dit stage."""
    return {"prompt": "x", "params": {"0": params}}


BAD_INPUT = {  # case: (path, body, status, what the error's message contains or its param is)
    # /generate: params
    "unknown stage id": (GENERATE, {"prompt": "x", "params": {"5": {}}}, 400, "no stage [5] in this"),
    "stage id not an int": (GENERATE, {"prompt": "x", "params": {"first": {}}}, 400, "params.first"),
    "stage params not a dict": (GENERATE, {"prompt": "x", "params": {"0": 3}}, 400, "params.0"),
    "unknown dit param": (GENERATE, dit(max_tokens=5), 400, "parameter(s) ['max_tokens']"),
    "steps of the wrong type": (GENERATE, dit(num_inference_steps="2"), 400, "steps must be an integer"),
    "width over the maximum": (GENERATE, dit(width=4096), 400, "stage 0 (dit): width 4096 exceeds"),
    "negative guidance": (GENERATE, dit(guidance_scale=-1), 400, "must be a finite number >= 0"),
    "seed beyond torch's generator": (GENERATE, dit(seed=2**70), 400, "seed must be in [-2**63, 2**64)"),
    "strength without an image": (GENERATE, dit(strength=0.5), 400, "strength is for image-to-image"),
    "as many previews as steps": (GENERATE, dit(partial_images=2, num_inference_steps=2), 400,
                                  "partial_images 2 must be fewer than the steps (2)"),
    "unknown output type": (GENERATE, dit(output_type="pt"), 400, "output_type must be one of"),
    "unknown sampler": (GENERATE, dit(sampler="Nope"), 400, "sampler 'Nope' is not supported by sd3"),
    # /generate: the body and the prompt
    "unknown top-level field": (GENERATE, {"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    "malformed JSON": (GENERATE, b'{"prompt": "x",', 400, "JSON decode error"),
    "a JSON array": (GENERATE, [], 400, "valid dictionary"),
    "no body": (GENERATE, b"", 400, "Field required"),
    "prompt missing": (GENERATE, {"params": {}}, 400, "prompt"),
    "prompt a number": (GENERATE, {"prompt": 3}, 400, "prompt"),
    "prompt a list": (GENERATE, {"prompt": ["a", "b"]}, 400, "prompt"),
    "prompt null": (GENERATE, {"prompt": None}, 400, "prompt"),
    "prompt dict with an unknown key": (GENERATE, {"prompt": {"text": "x"}}, 400,
                                        "unknown DiT prompt key(s) ['text']"),
    "prompt dict without a prompt": (GENERATE, {"prompt": {}}, 400,
                                     "prompt (a string) or prompt_embeds (tensors) is required"),
    "negative prompt a number": (GENERATE, {"prompt": {"prompt": "x", "negative_prompt": 3}}, 400,
                                 "negative_prompt must be a string"),
    "image not an image": (GENERATE, {"prompt": {"prompt": "x", "image": "cat.png"}}, 400,
                           "image must be a PIL image"),
    "prompt embeds as JSON": (GENERATE, {"prompt": {"prompt_embeds": [[1.0]], "pooled_prompt_embeds": [1.0]}},
                              400, "prompt_embeds must be a torch.Tensor"),
    "50 MB prompt to /generate": (GENERATE, {"prompt": "x" * BIG}, 413, "over the server's limit"),
    # /v1/images/generations
    "prompt over the length limit": (IMAGES, {"prompt": "x" * 32_001}, 400, "prompt"),
    "n far too large": (IMAGES, {"prompt": "x", "n": 10**6}, 400, "n"),
    "n not a number": (IMAGES, {"prompt": "x", "n": "many"}, 400, "n"),
    "size 0x0": (IMAGES, {"prompt": "x", "size": "0x0"}, 400, "size"),
    "seed 2**63": (IMAGES, {"prompt": "x", "seed": 2**63}, 400, "seed"),
    "fractional steps": (IMAGES, {"prompt": "x", "num_inference_steps": 1.5}, 400, "num_inference_steps"),
    "guidance NaN": (IMAGES, {"prompt": "x", "guidance_scale": "NaN"}, 400, "guidance_scale"),
    "50 MB prompt to images": (IMAGES, {"prompt": "x" * BIG}, 413, "over the server's limit"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_naming_the_problem_and_the_server_goes_on(url, case):
    path, body, status, problem = BAD_INPUT[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    response = requests.post(f"{url}{path}", data=data, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:2000]
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error"
    assert problem in error["message"] or problem == error["param"], error
    _assert_serves(url)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/generate", 405), ("POST", "/health", 405), ("POST", "/v1/no-such-endpoint", 404)],
)
def test_a_wrong_method_or_path_is_an_error_in_the_openai_schema(url, method, path, status):
    response = requests.request(method, f"{url}{path}", json={"prompt": "x"}, timeout=60)
    assert response.status_code == status and response.json()["error"]["code"] == status


def test_a_chunked_body_over_the_limit_is_refused_once_it_passes_it(url):
    chunk = b"x" * 2**20
    with socket.create_connection(_address(url), timeout=60) as client:
        head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        client.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        with contextlib.suppress(OSError):  # the server answers and closes once the limit is passed
            for _ in range(64):
                client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = _read_response(client)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the server's limit" in answer
    _assert_serves(url)


# ---- load --------------------------------------------------------------------------------------------------
def test_200_concurrent_image_requests_each_get_the_image_of_their_seed(url):
    seeds = range(4)
    reference = {seed: _image_request(url, seed) for seed in seeds}  # one at a time

    async def burst():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            posts = [client.post(f"{url}{IMAGES}", json=_image_body(i % 4)) for i in range(200)]
            return await asyncio.gather(*posts)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 200, {r.status_code: r.text for r in responses}
    for i, response in enumerate(responses):
        (item,) = response.json()["data"]  # exactly its own image: none lost, none doubled
        assert np.abs(_pixels(item["b64_json"]) - reference[i % 4]).max() <= 1, i  # uint8, batch layout
    assert _stage_stats(url).items() >= IDLE.items()


def test_a_burst_over_max_queued_requests_gets_fast_429s_with_retry_after(small_url):
    body = {"prompt": "burst", "num_inference_steps": 60}  # held long enough for the burst to meet it

    async def timed(client):
        start = time.monotonic()
        response = await client.post(f"{small_url}{IMAGES}", json=body)
        return response, time.monotonic() - start

    async def burst():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(timed(client) for _ in range(20)))

    answers = asyncio.run(burst())
    statuses = collections.Counter(response.status_code for response, _ in answers)
    assert statuses[200] >= 4 and statuses[429] >= 1 and statuses[200] + statuses[429] == 20, statuses
    for response, seconds in answers:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1" and seconds < 1, seconds
            assert response.json()["error"]["type"] == "rate_limit_exceeded"


def test_clients_that_go_away_give_their_admission_back(small_url):
    random.seed(0)
    for i in range(40):  # gone at any point: while added, queued, running, streaming
        body = {"prompt": "gone", "num_inference_steps": random.choice([1, 2, 3, 200]), "stream": i % 2 == 0}
        client = _send(small_url, IMAGES, body)
        time.sleep(random.uniform(0, 0.3))
        client.close()
    _wait_for_stats(small_url, lambda stats: stats.items() >= IDLE.items())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # all 4 places are free again
        statuses = list(pool.map(lambda seed: _image_request(small_url, seed, status_only=True), range(4)))
    assert statuses == [200] * 4


# ---- disconnects -------------------------------------------------------------------------------------------
DISCONNECTING = [
    (GENERATE, {"prompt": "gone", "params": {"0": {"num_inference_steps": SLOW_STEPS}}}),
    (IMAGES, {"prompt": "gone", "num_inference_steps": 1000}),
    (IMAGES, {"prompt": "gone", "num_inference_steps": 1000, "n": 2}),
    (IMAGES, {"prompt": "gone", "num_inference_steps": 1000, "stream": True, "partial_images": 1}),
]  # fmt: skip


def test_500_clients_that_go_away_mid_request_leave_nothing_behind(url):
    max_batch_size = requests.get(f"{url}/info", timeout=60).json()["stages"][0]["limits"]["max_batch_size"]
    random.seed(1)
    for _ in range(5):  # 100 at once: a third hang up at once, a third soon, the rest once a full batch runs
        clients = [_send(url, *DISCONNECTING[i % len(DISCONNECTING)]) for i in range(100)]
        random.shuffle(clients)
        for client in clients[:33]:
            client.close()
        time.sleep(0.2)
        for client in clients[33:66]:
            client.close()
        _wait_for_stats(url, lambda stats: stats["running"] == max_batch_size)
        for client in clients[66:]:
            client.close()
    _wait_for_stats(url, lambda stats: stats.items() >= IDLE.items())
    assert _segments(url) == []
    _assert_serves(url)


def test_a_request_cancelled_while_it_is_added_is_aborted_once_it_is_in():
    """The root cause of requests that outlived their client: a consumer cancelled while its add ran in a
    thread (or just as it ended) left the request in the stage with nobody to abort it."""
    omni = AsyncOmniLLM([OmniStageConfig(0, "echo", "none", ["latent"], ["latent"])])
    try:
        assert asyncio.run(_cancel_while_adding(omni)) == ["gone"]
    finally:
        omni.shutdown()


async def _cancel_while_adding(omni: AsyncOmniLLM) -> list[str]:
    """Cancels a request's consumer while the add runs, lets the add end; the ids aborted since."""
    adding, release, aborted = threading.Event(), threading.Event(), []
    add, abort = omni.manager.add_requests, omni.manager.abort

    def held_add(*args):
        adding.set()
        release.wait(60)
        add(*args)

    omni.manager.add_requests = held_add
    omni.manager.abort = lambda request_ids: (aborted.extend(request_ids), abort(request_ids))
    consumer = asyncio.ensure_future(anext(omni.generate({"nbytes": 64}, request_id="gone")))
    await asyncio.to_thread(adding.wait, 60)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    release.set()
    deadline = time.monotonic() + 60
    while not aborted and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return aborted


# ---- helpers -----------------------------------------------------------------------------------------------
def _assert_serves(url: str) -> None:
    body = {"prompt": "fine", "params": {"0": {"num_inference_steps": 1}}}
    response = requests.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200 and len(response.json()["images"]) == 1, response.text[:2000]


def _image_body(seed: int) -> dict:
    return {"prompt": "a red sunset", "seed": seed, "num_inference_steps": 1}


def _image_request(url: str, seed: int, status_only: bool = False):
    response = requests.post(f"{url}{IMAGES}", json=_image_body(seed), timeout=300)
    if status_only:
        return response.status_code
    assert response.status_code == 200, response.text[:2000]
    return _pixels(response.json()["data"][0]["b64_json"])


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=int)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _send(url: str, path: str, body: dict) -> socket.socket:
    """A raw client that sent a whole request (and will hang up without reading the answer)."""
    data = json.dumps(body).encode()
    client = socket.create_connection(_address(url))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    client.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return client


def _read_response(client: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def _stage_stats(url: str) -> dict:
    return requests.get(f"{url}/info", timeout=60).json()["stages"][0]["stats"]


def _wait_for_stats(url: str, condition, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(stats := _stage_stats(url)):
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats


def _segments(url: str) -> list[str]:
    """The pipeline's shared-memory segments in /dev/shm (named after the server's pid: ``stage_io``)."""
    port = url.rsplit(":", 1)[1]
    processes = psutil.process_iter(["cmdline"])
    (server,) = [p for p in processes if {"serve", port} <= set(p.info["cmdline"] or [])]
    return sorted(path.name for path in Path("/dev/shm").glob(f"vllm_omni_{server.pid}_*"))
