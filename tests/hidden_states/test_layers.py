"""Layers -1 (final, post-norm) and 0 (embeddings) in eager mode, against transformers."""

import pytest
from vllm import SamplingParams

from tests.hidden_states.conftest import PROMPTS, assert_matches_hf, opted_in
from tests.utils import running_llm

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=[-1, 0])
def layer_llm(request, qwen3_path):
    """An eager engine returning layer ``request.param``; 32 tokens per step (chunked prefill)."""
    with running_llm(
        qwen3_path,
        dtype="float32",
        return_prompt_hidden_states=True,
        prompt_hidden_states_layer=request.param,
        max_num_batched_tokens=32,
    ) as llm:
        yield request.param, llm


def test_chunked_mixed_batch_equals_hf(layer_llm, hf_qwen3):
    layer, llm = layer_llm
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    outputs = llm.generate(list(PROMPTS), [opted_in(), opted_in(), plain, opted_in()])
    for index in (0, 1, 3):
        assert_matches_hf(hf_qwen3, outputs[index], layer)
    assert outputs[2].outputs[0].prompt_hidden_states is None
