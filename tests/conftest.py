"""Shared fixtures: tiny checkpoints and real vLLM engines on CPU (one start costs 25-40 s: share them)."""

import gc
import os
from contextlib import contextmanager

import pytest

# Tiny models need little KV cache; vLLM's CPU default reserves far more.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_omni.testing.tiny_models import tiny_model_path  # noqa: E402


@contextmanager
def running_llm(model: str, **kwargs):
    """A real ``vllm.LLM`` on CPU, shut down (EngineCore and workers) on exit."""
    from vllm import LLM

    kwargs = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, **kwargs}
    llm = LLM(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


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
