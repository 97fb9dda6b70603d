"""Engines and the transformers reference for prompt hidden states (tiny qwen3, float32)."""

import pytest
import torch
from vllm import SamplingParams

from tests.utils import running_llm

# 5 to ~120 tokens (the tiny tokenizer splits words outside its training sentences into pieces): the
# longest spans four 32-token prefill chunks and KV blocks.
PROMPTS = (
    "Zebras quietly juggle xylophones while my wizard plays jazz on Mount Kilimanjaro. " * 2,
    "Hello, world!",
    "Seven jumbled quokkas vexed fourteen gnomes.",
    "The quick brown fox jumps over the lazy dog. Zebras juggle xylophones on Mount Kilimanjaro.",
)
ATOL = RTOL = 1e-5


def opted_in(**kwargs) -> SamplingParams:
    """Greedy sampling params of a request that asks for its prompt hidden states."""
    return SamplingParams(
        **{"temperature": 0.0, "max_tokens": 4, **kwargs}, extra_args={"prompt_hidden_states": True}
    )


class HFHiddenStates:
    """transformers' ``output_hidden_states`` of the same checkpoint, float32: the reference."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def __call__(self, token_ids: list[int], layer: int) -> torch.Tensor:
        with torch.no_grad():
            output = self.model(torch.tensor([token_ids]), output_hidden_states=True)
        return output.hidden_states[layer][0]


def assert_matches_hf(hf: HFHiddenStates, output, layer: int) -> float:
    """The output's prompt hidden states equal the reference; returns the max abs difference."""
    hidden_states = output.outputs[0].prompt_hidden_states
    expected = hf(output.prompt_token_ids, layer)
    assert hidden_states is not None, "no prompt_hidden_states"
    assert hidden_states.device.type == "cpu" and hidden_states.dtype == torch.float32
    assert hidden_states.shape == (len(output.prompt_token_ids), 64)
    torch.testing.assert_close(hidden_states, expected, atol=ATOL, rtol=RTOL)
    return (hidden_states - expected).abs().max().item()


@pytest.fixture(scope="session")
def hf_qwen3(qwen3_path) -> HFHiddenStates:
    return HFHiddenStates(qwen3_path)


PREEMPTING = dict(
    dtype="float32",
    return_prompt_hidden_states=True,
    max_model_len=256,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    block_size=32,
    num_gpu_blocks_override=9,
    disable_log_stats=False,
)
"""Engine settings under which long decodes preempt (see ``phs_llm``); stats on: tests read vLLM's
preemption counter."""


@pytest.fixture(scope="session")
def phs_llm(qwen3_path):
    """Layer -2 (aux path), default CPU compile mode, prefix caching on; 32 tokens per step (chunked
    prefill) and 8 usable KV blocks of 32 tokens (plus vLLM's null block) for up to 4 sequences, so
    long decodes preempt."""
    with running_llm(qwen3_path, enforce_eager=False, prompt_hidden_states_layer=-2, **PREEMPTING) as llm:
        yield llm
