"""``multimodal_embeddings`` chat content parts over a real ``vllm serve`` (tiny multimodal Qwen3, float32).

Greedy tokens are checked against the transformers reference on the prompt the chat template renders
with each part replaced by its placeholders, inline; one server serves every test.
"""

import base64
import io

import numpy as np
import pytest
import requests
import torch
from transformers import AutoTokenizer
from vllm.exceptions import VLLMValidationError

from tests.utils import running_server
from vllm_omni.renderers.multimodal_embeddings import NamedEmbedding, split_items
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.transformers_utils.multimodal_qwen3 import MultimodalQwen3HF

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_path() -> str:
    return tiny_model_path("multimodal_qwen3")


@pytest.fixture(scope="module")
def server(model_path):
    with running_server(model_path, "--dtype", "float32") as url:
        yield url


@pytest.fixture(scope="module")
def reference(model_path):
    """``(messages with parts as placeholder text, items) -> (expanded prompt ids, greedy tokens)``."""
    hf_model = MultimodalQwen3HF.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def run(messages: list[dict], items: dict[str, list[torch.Tensor]]) -> tuple[list[int], list[int]]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        return hf_model.expand_placeholders(ids, items), hf_model.greedy(ids, items, MAX_TOKENS)

    return run


def npy_b64(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy(), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def torch_b64(obj) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def sparse_b64(tensor: torch.Tensor) -> str:
    """``torch.save`` of ``tensor`` as a sparse COO tensor (the server densifies it)."""
    return torch_b64(tensor.to_sparse())


def embeddings(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def chat(url: str, content, **fields) -> requests.Response:
    body = {"model": model_name(url), "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            **fields}  # fmt: skip
    return requests.post(f"{url}/v1/chat/completions", json=body)


def model_name(url: str) -> str:
    return requests.get(f"{url}/v1/models").json()["data"][0]["id"]


def part(encode, **items: list[torch.Tensor]) -> dict:
    payload = {name: [encode(t) for t in group] for name, group in items.items()}
    return {"type": "multimodal_embeddings", "multimodal_embeddings": payload}


def as_text(content: list[dict]) -> list[dict]:
    """``content`` as the chat template sees it: each part replaced by its placeholders, inline."""

    def text(p: dict) -> dict:
        if p["type"] == "text":
            return p
        names = [name for name, group in p["multimodal_embeddings"].items() for _ in group]
        return {"type": "text", "text": "".join(f"<|{name}|>" for name in names)}

    return [{"role": "user", "content": [text(p) for p in content]}]


def assert_matches_reference(url, reference, content, items) -> None:
    response = chat(url, content)
    assert response.status_code == 200, response.text
    body = response.json()
    expected_prompt, expected_tokens = reference(as_text(content), items)
    assert body["prompt_token_ids"] == expected_prompt
    assert body["choices"][0]["token_ids"] == expected_tokens


@pytest.mark.engine
@pytest.mark.parametrize("encode", [npy_b64, torch_b64], ids=["npy", "torch_save"])
def test_part_between_text_parts_matches_transformers(server, reference, encode):
    audio, vision = [embeddings(1, 3, 24)], [embeddings(2, 16), embeddings(3, 2, 16)]  # 2-D and 1-D items
    content = [{"type": "text", "text": "Hello "}, part(encode, audio=audio, vision=vision),
               {"type": "text", "text": " the cat"}]  # fmt: skip
    assert_matches_reference(server, reference, content, {"audio": audio, "vision": vision})


@pytest.mark.engine
def test_part_only_message_matches_transformers(server, reference):
    audio = [embeddings(4, 24), embeddings(5, 2, 24)]
    assert_matches_reference(server, reference, [part(npy_b64, audio=audio)], {"audio": audio})


@pytest.mark.engine
def test_items_of_several_parts_keep_their_order(server, reference):
    first, second, vision = embeddings(6, 2, 24), embeddings(7, 24), embeddings(8, 4, 16)
    content = [part(npy_b64, audio=[first]), {"type": "text", "text": " and "},
               part(sparse_b64, vision=[vision], audio=[second])]  # fmt: skip
    assert_matches_reference(server, reference, content, {"audio": [first, second], "vision": [vision]})


def truncated_npy() -> str:
    """A .npy whose header declares far more data than it holds."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1000, 24), np.float32))
    return base64.b64encode(buffer.getvalue()[:200]).decode()


def invalid_sparse() -> str:
    indices = torch.tensor([[0, 99], [0, 0]])  # row 99 is outside the declared shape (2, 24)
    return torch_b64(torch.sparse_coo_tensor(indices, torch.ones(2), (2, 24), check_invariants=False))


BAD_PARTS = {
    "not_base64": ({"audio": "!!! not base64"}, "multimodal_embeddings['audio'][0] is not valid base64"),
    "not_a_string": ({"audio": [5]}, "multimodal_embeddings['audio'][0] must be a base64 string"),
    "not_a_file": ({"audio": base64.b64encode(b"hello").decode()},
                   "multimodal_embeddings['audio'][0] is neither a .npy file nor a torch.save file"),
    "not_a_tensor": ({"audio": torch_b64({"x": torch.zeros(24)})},
                     "multimodal_embeddings['audio'][0] holds a dict; allowed: one tensor"),
    "truncated_npy": ({"vision": truncated_npy()},
                      "multimodal_embeddings['vision'][0] is not a readable .npy"),
    "invalid_sparse": ({"audio": invalid_sparse()}, "multimodal_embeddings['audio'][0] is neither"),
    "wrong_width": ({"audio": npy_b64(torch.zeros(2, 16))},
                    "multimodal_embeddings['audio'][0] has shape (2, 16); allowed: (24,) or (n, 24)"),
    "wrong_dtype": ({"vision": npy_b64(torch.zeros(2, 16, dtype=torch.int32))},
                    "multimodal_embeddings['vision'][0] has dtype torch.int32; allowed: float32"),
    "nan": ({"audio": npy_b64(torch.full((24,), float("nan")))},
            "multimodal_embeddings['audio'][0] contains NaN or Inf"),
    "unknown_modality": ({"image": npy_b64(torch.zeros(24))},
                         "multimodal_embeddings: unknown modality 'image'; this model takes audio, vision"),
    "empty_payload": ({}, "multimodal_embeddings must be a non-empty object"),
    "empty_list": ({"vision": []},
                   "multimodal_embeddings['vision'] must be a base64 string or a non-empty list"),
}  # fmt: skip


@pytest.mark.engine
@pytest.mark.parametrize("payload, message", BAD_PARTS.values(), ids=BAD_PARTS.keys())
def test_bad_part_is_a_400_naming_the_field(server, payload, message):
    bad = {"type": "multimodal_embeddings", "multimodal_embeddings": payload}
    response = chat(server, [{"type": "text", "text": "Hi"}, bad])
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    good = chat(server, [{"type": "text", "text": "Hi"}, part(npy_b64, audio=[embeddings(9, 24)])])
    assert good.status_code == 200, good.text


def test_items_of_one_modality_come_from_one_kind_of_part():
    tagged, stock = (NamedEmbedding(torch.zeros(24)), None), (b"wav", None)
    assert split_items({"audio": [tagged], "image": [stock]}) == ({"image": [stock]}, {"audio": [tagged]})
    with pytest.raises(VLLMValidationError, match="'audio' items come both from multimodal_embeddings parts"):
        split_items({"audio": [tagged, stock]})
