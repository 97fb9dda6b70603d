"""Shared fixtures: tiny checkpoints and real vLLM engines on CPU (one start costs 25-40 s: share them)."""

import os

import pytest

# Tiny models need little KV cache; vLLM's CPU default reserves far more.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests.utils import HFReference, running_llm  # noqa: E402
from vllm_omni.testing.tiny_models import tiny_model_path  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_path() -> str:
    return tiny_model_path("qwen3")


@pytest.fixture(scope="session")
def llava_path() -> str:
    return tiny_model_path("llava")


@pytest.fixture(scope="session")
def qwen3_llm(qwen3_path):
    with running_llm(qwen3_path, dtype="float32") as llm:
        yield llm


@pytest.fixture(scope="session")
def llava_llm(llava_path):
    with running_llm(llava_path, dtype="float32") as llm:
        yield llm


@pytest.fixture(scope="session")
def hf_reference(llava_path) -> HFReference:
    return HFReference(llava_path)


@pytest.fixture(scope="session")
def llava_mm_llm(llava_path):
    """Tiny LLaVA, float32, feature on, prefix caching on (vLLM's default)."""
    with running_llm(llava_path, dtype="float32", enable_return_mm_embedding=True) as llm:
        yield llm
