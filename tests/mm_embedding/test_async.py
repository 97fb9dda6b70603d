"""mm_embedding through ``AsyncLLM`` streaming: exactly once in DELTA streams, never after the end."""

import pytest
import pytest_asyncio
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind

from tests.utils import image_request, random_image

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

ATOL = 1e-5


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def async_llm(llava_path):
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=llava_path, dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True,
        enable_return_mm_embedding=True,
    )  # fmt: skip
    engine = AsyncLLM.from_engine_args(args)
    yield engine
    engine.shutdown()


async def stream(engine, request_id: str, image, kind: RequestOutputKind, n: int = 1):
    sampling = SamplingParams(n=n, temperature=0.0 if n == 1 else 1.0, seed=0, max_tokens=6,
                              ignore_eos=True, output_kind=kind)  # fmt: skip
    return [out async for out in engine.generate(image_request(image), sampling, request_id)]


async def test_async_engine_args_carry_the_flag(async_llm):
    assert async_llm.vllm_config.model_config.multimodal_config.enable_return_mm_embedding


async def test_delta_stream_carries_it_exactly_once(async_llm, hf_reference):
    image = random_image(70)
    outputs = await stream(async_llm, "delta", image, RequestOutputKind.DELTA)
    carrying = [i for i, out in enumerate(outputs) if out.outputs[0].mm_embedding is not None]
    assert len(outputs) > 1 and len(carrying) == 1
    embedding = outputs[carrying[0]].outputs[0].mm_embedding
    torch.testing.assert_close(embedding, hf_reference(image), atol=ATOL, rtol=0)


async def test_cumulative_stream_carries_it_from_arrival_to_the_end(async_llm, hf_reference):
    image = random_image(71)
    outputs = await stream(async_llm, "cumulative", image, RequestOutputKind.CUMULATIVE)
    carrying = [out.outputs[0].mm_embedding is not None for out in outputs]
    first = carrying.index(True)
    assert all(carrying[first:]) and outputs[-1].finished
    torch.testing.assert_close(outputs[-1].outputs[0].mm_embedding, hf_reference(image), atol=ATOL, rtol=0)


async def test_final_only_output_carries_it(async_llm, hf_reference):
    image = random_image(72)
    (output,) = await stream(async_llm, "final", image, RequestOutputKind.FINAL_ONLY)
    torch.testing.assert_close(output.outputs[0].mm_embedding, hf_reference(image), atol=ATOL, rtol=0)


async def test_delta_stream_with_n_gives_each_completion_once(async_llm, hf_reference):
    image = random_image(73)
    outputs = await stream(async_llm, "delta-n", image, RequestOutputKind.DELTA, n=3)
    counts = {}
    for out in outputs:
        for completion in out.outputs:
            if completion.mm_embedding is not None:
                counts[completion.index] = counts.get(completion.index, 0) + 1
                torch.testing.assert_close(completion.mm_embedding, hf_reference(image), atol=ATOL, rtol=0)
    assert counts == {0: 1, 1: 1, 2: 1}


async def test_abort_mid_stream_leaves_nothing_behind(async_llm):
    sampling = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    async for _ in async_llm.generate(image_request(random_image(74)), sampling, "to-abort"):
        await async_llm.abort("to-abort")
        break
    engine_core = await async_llm.engine_core.call_utility_async("omni_patch_report")
    workers = await async_llm.collective_rpc("omni_patch_report")
    assert engine_core["mm_embedding_requests"] == 0
    assert [w["mm_embedding_requests"] for w in workers] == [0]
