"""`vllm serve MODEL --omni` on the tiny Qwen3 (an AR-only pipeline): vLLM's chat and completion endpoints
over the pipeline, with the official openai client, against the same model run offline."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.utils import running_server
from vllm_omni.testing.tiny_models import tiny_model_path

pytestmark = pytest.mark.engine

MAX_QUEUED = 3


@pytest.fixture(scope="module")
def url():
    args = ("--omni", "--dtype", "float32", "--served-model-name", "tiny", "--api-key", "key",
            "--max-queued-requests", str(MAX_QUEUED))  # fmt: skip
    with running_server(tiny_model_path("qwen3"), *args) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="key")


def post(url: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(
        f"{url}{path}", json=body, headers={"Authorization": "Bearer key"}, timeout=120, **kwargs
    )


HI = [{"role": "user", "content": "x"}]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
ASK = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
"""GREEDY through the openai client (ignore_eos is vLLM's extension)."""


def test_chat_equals_the_model_run_offline(client, qwen3_llm):
    from vllm import SamplingParams

    messages = [{"role": "user", "content": "Say something."}]
    response = client.chat.completions.create(model="tiny", messages=messages, **ASK)
    expected = qwen3_llm.chat(messages, SamplingParams(**GREEDY))[0]
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_chat_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Count."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, **ASK)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **ASK))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert (
        len([c for c in chunks if c.choices and c.choices[0].delta.content is not None]) > 2
    )  # token by token
    assert chunks[-1].usage.completion_tokens == 8


def test_completions_of_two_prompts_with_logprobs(client, qwen3_llm):
    from vllm import SamplingParams

    prompts = ["The sky is", "One two three"]
    response = client.completions.create(model="tiny", prompt=prompts, logprobs=2, **ASK)
    expected = qwen3_llm.generate(prompts, SamplingParams(**GREEDY))
    assert [c.text for c in response.choices] == [e.outputs[0].text for e in expected]
    assert all(len(c.logprobs.tokens) == 8 and len(c.logprobs.top_logprobs[0]) >= 2 for c in response.choices)
    streamed = client.completions.create(model="tiny", prompt=prompts[0], stream=True, **ASK)
    assert "".join(c.choices[0].text for c in streamed) == expected[0].outputs[0].text


def test_generate_streams_the_text_token_by_token(url):
    body = {"prompt": "The sky is", "params": {"0": GREEDY}, "stream": True}
    response = post(url, "/generate", body)
    events = [block.split("\n") for block in response.text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    data = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert names[-2:] == ["stage", "done"] and set(names[:-2]) == {"text"} and len(names) > 4
    assert "".join(d["delta"] for d in data[:-2]) == data[-1]["text"] == data[-2]["text"]
    assert data[-2]["num_generated_tokens"] == 8 and data[-1]["stages"]["0"]["finish_reason"] == "length"


def test_n_samples_and_a_seed(client):
    sampled = {"temperature": 1.0, "max_tokens": 6, "seed": 3, "n": 3}
    first = client.completions.create(model="tiny", prompt="Once", **sampled)
    again = client.completions.create(model="tiny", prompt="Once", **sampled)
    assert len(first.choices) == 3 and [c.text for c in first.choices] == [c.text for c in again.choices]


BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": "tiny"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "temperature": -1},
     "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 4096},
     "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "n": 0}, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "modalities": ["text", "audio"],
                              "audio": {"voice": "Chelsie", "format": "wav"}}, "modalities"),  # no talker
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 600}, None),  # longer than --max-model-len 512
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 100000}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, None),  # a token id out of the vocabulary
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_requests_are_400_and_the_server_goes_on(url, path, body, param):
    response = post(url, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["message"]
    if param is not None:
        assert param in (error["param"] or "") or param in error["message"]
    good = post(url, "/v1/completions", {"model": "tiny", "prompt": "fine", "max_tokens": 2})
    assert good.status_code == 200


def test_an_unknown_model_is_404_and_the_key_is_needed(url):
    response = post(url, "/v1/completions", {"model": "other", "prompt": "x"})
    assert response.status_code == 404 and "other" in response.json()["error"]["message"]
    response = requests.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert response.status_code == 401


def _open_stream(url: str, max_tokens: int) -> socket.socket:
    """A streaming completion, sent raw; returns the socket once the first chunk came back."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True})  # fmt: skip
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer key\r\n"
    sock.sendall(
        f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    assert b"200 OK" in sock.recv(4096)
    return sock


def _stage_unfinished(url: str) -> int:
    info = requests.get(f"{url}/info", headers={"Authorization": "Bearer key"}, timeout=30).json()
    return info["stages"][0]["stats"]["unfinished"]


def test_over_the_queue_bound_is_429_and_a_client_that_goes_away_aborts(url):
    streams = [_open_stream(url, 400) for _ in range(MAX_QUEUED)]
    started = time.monotonic()
    response = post(url, "/v1/chat/completions", {"model": "tiny", "messages": HI})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 5 and response.json()["error"]["type"] == "rate_limit_exceeded"
    assert _stage_unfinished(url) == MAX_QUEUED
    for sock in streams:
        sock.close()
    deadline = time.monotonic() + 30
    while _stage_unfinished(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stage_unfinished(url) == 0  # aborted in the stage, long before 400 tokens each
    assert post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_concurrent_requests_each_get_their_own_answer(client, qwen3_llm):
    from vllm import SamplingParams

    prompts = [f"Number {i}" for i in range(MAX_QUEUED)]
    with concurrent.futures.ThreadPoolExecutor(MAX_QUEUED) as pool:
        answers = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, **ASK), prompts))
    expected = qwen3_llm.generate(prompts, SamplingParams(**GREEDY))
    assert [a.choices[0].text for a in answers] == [e.outputs[0].text for e in expected]


def test_the_chat_client_example(url):
    example = Path(__file__).parents[2] / "examples" / "online_serving" / "omni_chat_client.py"
    result = subprocess.run([sys.executable, str(example), "--url", url, "--api-key", "key"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("answer: ") and "streamed in" in result.stdout


def test_pipelines_that_answer_in_text_have_text_endpoints_image_pipelines_not():
    from vllm_omni.config.stage import create_ar_stage_config, create_dit_stage_config
    from vllm_omni.entrypoints.openai.text_serving import serves_text, text_stage
    from vllm_omni.pipeline.qwen2_5_omni_stages import qwen2_5_omni_stages

    ar, dit = create_ar_stage_config(0, "m"), create_dit_stage_config(1, tiny_model_path("sd3"))
    assert serves_text([ar]) and not serves_text([ar, dit])
    assert text_stage([ar, create_ar_stage_config(1, "m")]) == 1  # AR -> AR: the second's text
    assert text_stage(qwen2_5_omni_stages(tiny_model_path("qwen2_5_omni"))) == 0  # the thinker's
