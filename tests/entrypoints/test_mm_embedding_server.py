"""mm_embedding over `vllm serve --enable-return-mm-embedding`, with and without `--omni` (real server on CPU,
tiny LLaVA); prompt hidden states asked of it are refused."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch

from tests.utils import random_image, running_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=["vllm", "omni"])
def server(request, llava_path):
    """Stock ``vllm serve`` and ``vllm serve --omni`` (its chat routes over an AR-only pipeline): the same."""
    omni = ("--omni",) if request.param == "omni" else ()
    with running_server(llava_path, *omni, "--dtype", "float32", "--enable-return-mm-embedding") as url:
        yield url


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(image, **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "Hi"}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **fields}  # fmt: skip


def decode(field: dict) -> np.ndarray:
    array = np.load(io.BytesIO(base64.b64decode(field["data"])), allow_pickle=False)
    assert list(array.shape) == field["shape"]
    return array


def model_name(url: str) -> str:
    return requests.get(f"{url}/v1/models").json()["data"][0]["id"]


def test_chat_returns_the_embedding_as_npy(server, hf_reference):
    image = random_image(80)
    body = {**chat_body(image, return_mm_embedding=True), "model": model_name(server)}
    response = requests.post(f"{server}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    field = response.json()["choices"][0]["mm_embedding"]
    assert field["dtype"] == "float32"
    assert field["items"] == [{"modality": "image", "index": 0, "offset": 0, "length": 16}]
    torch.testing.assert_close(torch.from_numpy(decode(field)), hf_reference(image), atol=1e-5, rtol=0)


def test_chat_without_the_field_returns_none(server):
    body = {**chat_body(random_image(81)), "model": model_name(server)}
    choice = requests.post(f"{server}/v1/chat/completions", json=body).json()["choices"][0]
    assert "mm_embedding" not in choice


def test_chat_stream_sends_it_in_the_last_chunk(server, hf_reference):
    image = random_image(82)
    body = {**chat_body(image, return_mm_embedding=True, stream=True, mm_embedding_pooling="mean",
                        mm_embedding_dtype="bfloat16"), "model": model_name(server)}  # fmt: skip
    with requests.post(f"{server}/v1/chat/completions", json=body, stream=True) as response:
        events = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    carrying = [json.loads(e[6:]) for e in events[:-1] if "mm_embedding" in e]
    assert len(carrying) == 1 and events[-2] == "data: " + json.dumps(carrying[0])
    field = carrying[0]["choices"][0]["mm_embedding"]
    assert field["dtype"] == "bfloat16" and field["shape"] == [1, 64]
    restored = torch.from_numpy(decode(field)).view(torch.bfloat16).float()
    expected = hf_reference(image).mean(0, keepdim=True)
    torch.testing.assert_close(restored, expected, atol=2e-2, rtol=2e-2)


def test_bad_option_is_a_400_naming_the_field(server):
    body = {**chat_body(random_image(83), return_mm_embedding=True, mm_embedding_dtype="int8"),
            "model": model_name(server)}  # fmt: skip
    response = requests.post(f"{server}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "mm_embedding_dtype must be one of auto, float16, bfloat16, float32" in response.text
    ok = requests.post(f"{server}/v1/chat/completions", json={**body, "mm_embedding_dtype": "auto"})
    assert ok.status_code == 200


def test_completions_accept_the_field(server):
    body = {"model": model_name(server), "prompt": "Hello", "max_tokens": 3, "return_mm_embedding": True}
    response = requests.post(f"{server}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["mm_embedding"] is None  # a text prompt has no items
    bad = requests.post(f"{server}/v1/completions", json={**body, "mm_embedding_pooling": "max"})
    assert bad.status_code == 400 and "mm_embedding_pooling must be one of none, mean" in bad.text


def test_prompt_hidden_states_without_the_server_flag_is_a_400(server):
    model = model_name(server)
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "return_prompt_hidden_states": True}
    response = requests.post(f"{server}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "return_prompt_hidden_states"
    assert "--return-prompt-hidden-states" in error["message"]
    chat_request = {**chat_body(random_image(84), return_prompt_hidden_states=True), "model": model}
    chat = requests.post(f"{server}/v1/chat/completions", json=chat_request)
    assert chat.status_code == 400 and "--return-prompt-hidden-states" in chat.text
