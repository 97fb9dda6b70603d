"""AsyncOmniLLM: streamed snapshots, concurrent requests, abort at any stage frees every stage."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from vllm import SamplingParams

from vllm_omni import AsyncOmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.testing.tiny_models import tiny_model_path

pytestmark = pytest.mark.engine

AR_ARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True)
DIT = dict(num_inference_steps=3, height=32, width=32)


def stages(**dit):
    ar = create_ar_stage_config(0, tiny_model_path("qwen3"), **AR_ARGS)
    return [ar, create_dit_stage_config(1, tiny_model_path("sd3"), **{**DIT, **dit})]


@pytest.fixture(scope="module")
def omni():
    engine = AsyncOmniLLM(stages())
    yield engine
    engine.shutdown()


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(omni, prompt, params, request_id=None):
    return [out async for out in omni.generate(prompt, params, request_id=request_id)]


def test_streams_tokens_then_the_image(omni):
    params = [
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        {"seed": 3, "output_type": "np"},
    ]
    snapshots = run(collect(omni, "A beautiful landscape", params))
    ar = [s for s in snapshots if s.stage_id == 0]
    assert len(ar) == 5  # one per token (CUMULATIVE), the last one finished
    assert [len(s.stage_outputs[0].outputs[0].token_ids) for s in ar] == [1, 2, 3, 4, 5]
    assert ar[-1].stage_outputs[0].finished and not any(s.finished for s in snapshots[:-1])
    final = snapshots[-1]
    assert final.finished and final.error is None and final.stage_id == 1
    assert final.text == ar[-1].stage_outputs[0].outputs[0].text
    assert final.images.shape == (1, 32, 32, 3)


def test_concurrent_requests_match_one_at_a_time(omni):
    prompts = [f"prompt number {i}" for i in range(6)]
    params = [
        [SamplingParams(temperature=0.0, max_tokens=4 + i), {"seed": i, "output_type": "np"}]
        for i in range(6)
    ]

    async def all_at_once():
        return await asyncio.gather(*(collect(omni, p, q) for p, q in zip(prompts, params, strict=True)))

    async def one_at_a_time():
        return [await collect(omni, p, q) for p, q in zip(prompts, params, strict=True)]

    together, alone = run(all_at_once()), run(one_at_a_time())
    for got, want in zip(together, alone, strict=True):
        assert got[-1].error is None and got[-1].text == want[-1].text
        assert np.abs(got[-1].images - want[-1].images).max() < 1e-5


async def until_denoising(omni, stage_id: int = 1, timeout: float = 60.0) -> None:
    """Wait until the DiT stage is running a request (no fixed sleeps: machines differ in speed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await omni.stage_stats(stage_id))["running"] == 0:
        assert asyncio.get_running_loop().time() < deadline, "no request reached the DiT stage"
        await asyncio.sleep(0.05)


def _assert_idle(omni):
    stats = [run(omni.stage_stats(0)), run(omni.stage_stats(1))]
    assert stats[0]["unfinished"] == 0
    assert (stats[1]["running"], stats[1]["waiting"], stats[1]["states"]) == (0, 0, 0)


def test_abort_in_the_ar_stage(omni):
    async def abort_after_first_token():
        seen = []
        params = [SamplingParams(max_tokens=200, ignore_eos=True), {"seed": 1}]
        async for out in omni.generate("abort me", params, request_id="ar-abort"):
            seen.append(out)
            if len(seen) == 1:
                await omni.abort("ar-abort")
        return seen

    seen = run(abort_after_first_token())
    assert seen[-1].finished and seen[-1].error == "aborted" and seen[-1].stage_id is None
    assert 1 not in seen[-1].stage_outputs
    _assert_idle(omni)


def test_abort_in_the_dit_stage_and_by_cancelling(omni):
    slow = [SamplingParams(max_tokens=2), {"seed": 1, "num_inference_steps": 20_000}]  # never ends by itself

    async def abort_while_denoising():
        seen = []
        async for out in omni.generate("draw slowly", slow, request_id="dit-abort"):
            seen.append(out)
            if out.stage_id == 0 and out.stage_outputs[0].finished:
                await until_denoising(omni)
                await omni.abort("dit-abort")
        return seen

    seen = run(abort_while_denoising())
    assert seen[-1].error == "aborted" and 1 not in seen[-1].stage_outputs
    _assert_idle(omni)

    async def cancel_consumer():
        task = asyncio.create_task(collect(omni, "draw slowly again", slow))
        await until_denoising(omni)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_consumer())
    _assert_idle(omni)


def test_a_later_stage_rejection_is_refused_before_any_stage_runs(omni):
    with pytest.raises(
        ValueError, match=r"^stage 1 \(dit\): height must be a multiple of 4 for sd3, got 30$"
    ):
        run(collect(omni, "bad size", [SamplingParams(max_tokens=2), {"height": 30}]))
    with pytest.raises(ValueError, match=r"^stage 1 \(dit\): sampler 'Nope' is not supported by sd3"):
        run(collect(omni, "bad sampler", [SamplingParams(max_tokens=2), {"sampler": "Nope"}]))
    with pytest.raises(ValueError, match=r"^stage 0 \(ar\): Requested sample logprobs of 100000"):
        run(collect(omni, "bad logprobs", [SamplingParams(max_tokens=2, logprobs=100_000), None]))
    assert run(omni.stage_stats(0))["unfinished"] == 0  # stage 0 never saw them
    _assert_idle(omni)
    with pytest.raises(ValueError, match="DELTA is not supported on a stage that feeds a later one"):
        from vllm.sampling_params import RequestOutputKind

        run(collect(omni, "x", [SamplingParams(output_kind=RequestOutputKind.DELTA), None]))


def test_a_request_id_in_use_is_refused_and_the_running_request_goes_on(omni):
    params = [SamplingParams(temperature=0.0, max_tokens=4), {"seed": 1, "num_inference_steps": 20_000}]

    async def both():
        first = asyncio.create_task(collect(omni, "first", params, request_id="dup"))
        await until_denoising(omni)
        with pytest.raises(ValueError, match="request id 'dup' is already in the pipeline"):
            await collect(omni, "second", params, request_id="dup")
        assert (await omni.stage_stats(1))["running"] == 1  # the first one goes on
        await omni.abort("dup")
        return await first

    snapshots = run(both())
    assert snapshots[-1].prompt == "first" and snapshots[-1].error == "aborted"
    _assert_idle(omni)


def test_shutdown_ends_open_streams_with_an_error():
    dit_only = AsyncOmniLLM(
        [create_dit_stage_config(0, tiny_model_path("sd3"), **{**DIT, "num_inference_steps": 20_000})]
    )

    async def shut_down_while_streaming():
        task = asyncio.create_task(collect(dit_only, "never finishes", None))
        await until_denoising(dit_only, stage_id=0)
        await asyncio.to_thread(dit_only.shutdown)
        return await asyncio.wait_for(task, timeout=30)

    snapshots = run(shut_down_while_streaming())
    assert snapshots[-1].finished and snapshots[-1].error == "the pipeline is shut down"
    with pytest.raises(RuntimeError, match="the pipeline is shut down"):
        run(collect(dit_only, "after", None))
