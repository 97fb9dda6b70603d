"""Prompt hidden states over `vllm serve --return-prompt-hidden-states`, with and without `--omni` (real
server on CPU, tiny Qwen3, float32, layer -2), against the same engine run offline."""

import base64
import concurrent.futures
import contextlib
import io
import json

import numpy as np
import pytest
import requests
import torch
from vllm import SamplingParams

from tests.utils import running_llm, running_server

pytestmark = pytest.mark.engine

LAYER = "-2"
MESSAGES = [{"role": "user", "content": "Seven jumbled quokkas vexed fourteen gnomes."}]
PROMPTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def offline(qwen3_path):
    """The reference: ``vllm.LLM`` with the feature on, the server's dtype and layer."""
    with running_llm(
        qwen3_path, dtype="float32", return_prompt_hidden_states=True, prompt_hidden_states_layer=int(LAYER)
    ) as llm:
        yield llm


@pytest.fixture(scope="module", params=["vllm", "omni"])
def server(request, qwen3_path):
    """Stock ``vllm serve`` and ``vllm serve --omni`` (vLLM's serving classes over an AR-only pipeline).
    The first starts while the offline reference loads (the two engine starts overlap)."""
    omni = ("--omni",) if request.param == "omni" else ()
    flags = ("--dtype", "float32", "--served-model-name", "tiny", "--return-prompt-hidden-states",
             "--prompt-hidden-states-layer", LAYER)  # fmt: skip
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(stack.enter_context, running_server(qwen3_path, *omni, *flags))
        request.getfixturevalue("offline")
        yield starting.result()


def asked(**fields) -> dict:
    return {"model": "tiny", "max_tokens": 3, "temperature": 0, "return_prompt_hidden_states": True, **fields}


def decode(field: dict) -> torch.Tensor:
    array = np.load(io.BytesIO(base64.b64decode(field["data"])), allow_pickle=False)
    assert list(array.shape) == field["shape"]
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if field["dtype"] == "bfloat16" else tensor


def expected_chat(offline) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, extra_args={"prompt_hidden_states": True})
    return offline.chat(MESSAGES, params)[0].outputs[0].prompt_hidden_states


def test_chat_equals_the_engine_run_offline(server, offline):
    response = requests.post(f"{server}/v1/chat/completions", json=asked(messages=MESSAGES))
    assert response.status_code == 200, response.text
    body = response.json()
    field = body["choices"][0]["prompt_hidden_states"]
    assert field["dtype"] == "float32" and field["shape"] == [body["usage"]["prompt_tokens"], 64]
    assert torch.equal(decode(field), expected_chat(offline))


def test_completions_of_two_prompts_each_get_their_own(server, offline):
    response = requests.post(f"{server}/v1/completions", json=asked(prompt=PROMPTS))
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    params = SamplingParams(max_tokens=1, extra_args={"prompt_hidden_states": True})
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    for choice, output in zip(choices, expected, strict=True):
        assert torch.equal(decode(choice["prompt_hidden_states"]), output.outputs[0].prompt_hidden_states)


def test_chat_stream_sends_it_in_the_last_chunk(server, offline):
    body = asked(messages=MESSAGES, stream=True, prompt_hidden_states_dtype="bfloat16")
    with requests.post(f"{server}/v1/chat/completions", json=body, stream=True) as response:
        events = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    carrying = [json.loads(e[6:]) for e in events[:-1] if "prompt_hidden_states" in e]
    assert len(carrying) == 1 and events[-2] == "data: " + json.dumps(carrying[0])
    (choice,) = carrying[0]["choices"]
    assert choice["index"] == 0 and choice["delta"] == {}
    assert torch.equal(decode(choice["prompt_hidden_states"]), expected_chat(offline).to(torch.bfloat16))


def test_without_the_field_choices_carry_nothing_extra(server):
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2}
    choice = requests.post(f"{server}/v1/completions", json=body).json()["choices"][0]
    assert "prompt_hidden_states" not in choice and "mm_embedding" not in choice


def test_bad_dtype_is_a_400_naming_the_field(server):
    body = asked(messages=MESSAGES, prompt_hidden_states_dtype="int8")
    bad = requests.post(f"{server}/v1/chat/completions", json=body)
    assert bad.status_code == 400
    assert "prompt_hidden_states_dtype must be one of auto, float16, bfloat16, float32" in bad.text


def test_mm_embedding_asked_of_this_server_is_a_400(server):
    body = asked(prompt=PROMPTS[0], return_mm_embedding=True)
    response = requests.post(f"{server}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "--enable-return-mm-embedding" in error["message"] and error["param"] == "return_mm_embedding"
