"""Pipeline core without vLLM engines: stage kinds, checks before compute, hand-offs without copies,
final_output, queue bounds, stage processes that fail at start, scripts without a main guard."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vllm_omni.testing.echo_stage  # noqa: F401  (registers the echo kind)
from vllm_omni import AsyncOmniLLM, OmniLLM, OmniStageConfig, create_dit_stage_config
from vllm_omni.pipeline.stage_io import SHM_DIR, dumps, loads, new_segment_prefix
from vllm_omni.pipeline.stage_manager import OmniQueueFullError, OmniStageError
from vllm_omni.testing.tiny_models import tiny_model_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST_DIT = dict(num_inference_steps=1, height=32, width=32)
MIB = 1 << 20


def segments(prefix: str) -> list[str]:
    return [p.name for p in SHM_DIR.glob(f"{prefix}*")]


def echo(stage_id: int, **options) -> OmniStageConfig:
    stage_input = "echo_tensor" if stage_id else None
    return OmniStageConfig(stage_id, "echo", "none", ["latent"], ["latent"], engine_args=options,
                           stage_input=stage_input)  # fmt: skip


def test_a_kept_tensor_is_passed_on_by_its_segment_without_a_copy():
    prefix, tensor = new_segment_prefix(), torch.randn(MIB)
    from_stage = dumps({"t": tensor}, threshold=1, prefix=prefix)
    kept: list[str] = []
    in_manager = loads(from_stage, keep=kept)["t"]
    assert len(kept) == 1 and segments(prefix) == kept  # mapped, still there to pass on
    forwarded: list[str] = []
    to_stage = dumps({"t": in_manager}, threshold=1, prefix=prefix, forwarded=forwarded)
    assert forwarded == kept and segments(prefix) == kept  # the same segment: nothing written again
    received = loads(to_stage)["t"]
    assert torch.equal(received, tensor) and segments(prefix) == []  # the receiver unlinked it
    received.add_(1)  # copy-on-write: the manager's tensor does not change
    assert torch.equal(in_manager, tensor)
    again: list[str] = []
    loads(dumps(in_manager, threshold=1, prefix=prefix, forwarded=again))  # passed on once, then copied
    assert again == [] and segments(prefix) == []


def test_a_new_kind_runs_in_a_pipeline_and_tensors_reach_the_next_stage_uncopied():
    omni = OmniLLM([echo(0), echo(1)], shm_threshold=MIB)
    try:
        out = omni.generate({"nbytes": 4 * MIB}, use_tqdm=False)[0]
        assert out.error is None and list(out.stage_outputs) == [0, 1]
        assert torch.equal(out.latents, torch.arange(MIB, dtype=torch.float32))
        assert out.stage_outputs[1].handoff_seconds > 0
        assert (
            segments(omni.manager.running.codec.prefix) == []
        )  # kept, passed on, or unlinked: nothing left behind
    finally:
        omni.close()


def test_final_output_false_returns_nothing_of_that_stage():
    stages = [echo(0), echo(1)]
    stages[0].final_output = False
    for keep, returned in ((False, [1]), (True, [0, 1])):
        omni = OmniLLM(stages, keep_stage_outputs=keep)
        try:
            out = omni.generate({"nbytes": 4 * MIB}, use_tqdm=False)[0]
            assert out.error is None and sorted(out.stage_outputs) == returned
            assert all(not r.outputs for r in omni.manager.requests.values())
        finally:
            omni.close()


def test_stages_that_fail_at_start_say_why():
    with pytest.raises(
        OmniStageError, match=r"(?s)stage 1 \(echo\) failed to start:.*RuntimeError: no model"
    ):
        OmniLLM([echo(0), echo(1, raise_at_start="no model")])
    expected = (
        r"(?s)stage 0 \(echo\) exited with code 3; its last output:\necho stage: exiting while it starts"
    )
    with pytest.raises(OmniStageError, match=expected):
        OmniLLM([echo(0, exit_at_start=3)])


@pytest.fixture(scope="module")
def dit_to_dit():
    """Text-to-image, then image-to-image, on the tiny SD3."""
    t2i = create_dit_stage_config(0, tiny_model_path("sd3"), **FAST_DIT)
    i2i = create_dit_stage_config(1, tiny_model_path("sd3"), ["text", "image"], ["image"], **FAST_DIT)
    omni = AsyncOmniLLM([t2i, i2i])
    yield omni
    omni.shutdown()


async def collect(omni, prompt, params, request_id=None):
    return [out async for out in omni.generate(prompt, params, request_id=request_id)]


def test_a_request_a_later_stage_refuses_costs_no_compute(dit_to_dit):
    for params, message in (
        ([None, {"height": 30}], r"^stage 1 \(dit\): height must be a multiple of 4 for sd3, got 30$"),
        ([None, {"width": 1 << 14}], r"^stage 1 \(dit\): width 16384 exceeds the stage's maximum"),
        ([{"sampler": "Nope"}, None], r"^stage 0 \(dit\): sampler 'Nope' is not supported by sd3"),
    ):
        with pytest.raises(ValueError, match=message):
            asyncio.run(collect(dit_to_dit, "a red sunset", params))
    stats = asyncio.run(dit_to_dit.stage_stats(0))
    assert (stats["running"], stats["waiting"], stats["states"]) == (0, 0, 0)
    out = asyncio.run(collect(dit_to_dit, "a red sunset", [{"seed": 1}, {"seed": 2}]))[-1]
    assert out.error is None and out.images is not None  # and it keeps serving


def test_the_pipeline_holds_no_more_than_its_stage_queues():
    slow = create_dit_stage_config(0, tiny_model_path("sd3"), max_batch_size=1, max_waiting_requests=1,
                                   num_inference_steps=20_000, height=32, width=32)  # fmt: skip
    omni = AsyncOmniLLM([slow])

    async def overfill():
        first = [asyncio.create_task(collect(omni, "slow", None)) for _ in range(2)]
        while omni.manager.free_slots() != 0:
            await asyncio.sleep(0.01)
        with pytest.raises(OmniQueueFullError, match=r"stage 0 \(dit\): 2 requests are in it .* at most 2"):
            await collect(omni, "one too many", None)
        await omni.abort(list(omni.manager.requests))
        return [(await task)[-1].error for task in first]

    try:
        assert asyncio.run(overfill()) == ["aborted", "aborted"]
    finally:
        omni.shutdown()


def test_offline_generate_feeds_more_prompts_than_the_queues_hold():
    stage = create_dit_stage_config(0, tiny_model_path("sd3"), max_batch_size=1, max_waiting_requests=1,
                                    **FAST_DIT)  # fmt: skip
    omni = OmniLLM([stage])
    try:
        outputs = omni.generate([f"picture {i}" for i in range(5)], {"output_type": "latent"}, use_tqdm=False)
    finally:
        omni.close()
    assert [o.error for o in outputs] == [None] * 5


SCRIPT = f"""
from vllm_omni import OmniLLM, create_dit_stage_config
from vllm_omni.testing.tiny_models import tiny_model_path
size = {FAST_DIT!r}
t2i = create_dit_stage_config(0, tiny_model_path("sd3"), final_output=False, **size)
i2i = create_dit_stage_config(1, tiny_model_path("sd3"), ["text", "image"], ["image"], **size)
omni = OmniLLM([t2i, i2i])
out = omni.generate("a red sunset", [{{"seed": 1}}, {{"seed": 2}}], use_tqdm=False)[0]
print("done", out.error, sorted(out.stage_outputs), flush=True)
omni.close()
"""


@pytest.mark.parametrize("how", ["file", "-c", "stdin"])
def test_a_script_without_a_main_guard_runs_a_two_stage_pipeline(tmp_path, how):
    path = tmp_path / "no_guard.py"
    path.write_text(textwrap.dedent(SCRIPT))
    command = {"file": [str(path)], "-c": ["-c", SCRIPT], "stdin": ["-"]}[how]
    stdin = SCRIPT if how == "stdin" else None
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, *command], input=stdin, capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done None [1]" in result.stdout


@pytest.mark.parametrize("omp_num_threads", [None, "2"])
def test_an_in_process_ar_engine_computes_on_the_threads_vllms_cpu_worker_would(omp_num_threads):
    """vLLM's CPU worker process gets the cores but one (one is reserved for the engine core and the
    frontend); an ar stage's in-process worker gets as many, unless OMP_NUM_THREADS says otherwise."""
    code = textwrap.dedent("""
        import os, torch
        from vllm_omni.pipeline.kinds.ar import _run_engine_in_process
        engine_args = {}
        _run_engine_in_process(engine_args)
        print(torch.get_num_threads(), engine_args, os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    """)
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING")
    }
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = omp_num_threads or str(max(1, len(os.sched_getaffinity(0)) - 1))
    assert result.stdout.split("\n")[-2] == f"{expected} {{'distributed_executor_backend': 'uni'}} 0"
