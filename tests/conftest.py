"""Shared fixtures: tiny checkpoints and real vLLM engines on CPU (one start costs 25-40 s: share them)."""

import os

import pytest
import torch

# Tiny models need little KV cache; vLLM's CPU default reserves far more.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _one_core_per_xdist_worker() -> None:
    """Under `make test`'s pytest-xdist workers, each worker computes on a core of its own: vLLM's CPU
    workers it starts bind there (vLLM's automatic binding would put every engine of both workers on core
    0, keeping core 1 for frontends), and its own torch and the processes it starts run one OpenMP thread
    (two threads per worker on 2 cores spin against each other). Explicit settings win."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker is None:
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[int(worker[2:]) % len(cores)]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_one_core_per_xdist_worker()

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
