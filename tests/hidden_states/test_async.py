"""Per-layer hidden states of every position through ``AsyncLLM``: once, in the final output of any
stream; an abort mid-stream leaves nothing behind."""

import pytest
import pytest_asyncio
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind

from tests.hidden_states.conftest import PROMPTS
from tests.hidden_states.test_all_positions import LAYERS, assert_rows_match_hf

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def async_llm(qwen3_path):
    from vllm.v1.engine.async_llm import AsyncLLM

    # Stats off: an engine logging stats replaces the Prometheus metrics that other tests' engines read.
    args = AsyncEngineArgs(
        model=qwen3_path, dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True,
        max_num_batched_tokens=32, return_prompt_hidden_states=True, prompt_hidden_states_layer=LAYERS,
        disable_log_stats=True,
    )  # fmt: skip
    engine = AsyncLLM.from_engine_args(args)
    yield engine
    engine.shutdown()


def all_positions(kind: RequestOutputKind, max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind,
                          extra_args={"prompt_hidden_states": "all"})  # fmt: skip


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
async def test_streams_carry_them_once_in_the_final_output(async_llm, hf_qwen3, kind):
    outputs = [out async for out in async_llm.generate(PROMPTS[0], all_positions(kind), f"stream-{kind}")]
    carrying = [out for out in outputs if out.outputs[0].hidden_states is not None]
    assert len(outputs) > 1 and carrying == [outputs[-1]] and outputs[-1].finished
    generated = [t for out in outputs for t in out.outputs[0].token_ids]
    if kind == RequestOutputKind.CUMULATIVE:
        generated = list(outputs[-1].outputs[0].token_ids)
    assert_rows_match_hf(hf_qwen3, outputs[-1], outputs[0].prompt_token_ids + generated[:-1])


async def test_abort_mid_stream_leaves_nothing_behind(async_llm):
    params = all_positions(RequestOutputKind.DELTA, max_tokens=200)
    async for _ in async_llm.generate(PROMPTS[2], params, "to-abort"):
        await async_llm.abort("to-abort")
        break
    engine_core = await async_llm.engine_core.call_utility_async("omni_patch_report")
    workers = await async_llm.collective_rpc("omni_patch_report")
    assert engine_core["hidden_states_requests"] == 0
    assert [w["prompt_hidden_states_requests"] for w in workers] == [0]
