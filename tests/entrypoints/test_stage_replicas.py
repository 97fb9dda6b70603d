"""Stage replicas (local processes): the same results as one copy, every copy used, a dead copy fails only
its own requests."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import vllm_omni.testing.echo_stage  # noqa: F401  (registers the echo kind)
from vllm_omni import OmniLLM, OmniStageConfig, create_dit_stage_config
from vllm_omni.testing.tiny_models import tiny_model_path

FAST_DIT = dict(num_inference_steps=2, height=32, width=32)
SLOW_STEPS = 20_000  # far longer than any wait below


def test_replica_settings_are_checked():
    with pytest.raises(ValueError, match="stage 0: replicas must be an integer >= 1, got 0"):
        OmniStageConfig(0, "echo", "none", ["latent"], ["latent"], replicas=0)
    with pytest.raises(ValueError, match=r"stage 0: cpus lists 1 placements for 2 replica\(s\)"):
        OmniStageConfig(0, "echo", "none", ["latent"], ["latent"], replicas=2, cpus=["0"])
    with pytest.raises(ValueError, match="stage 0: cpus must list CPU ids"):
        OmniStageConfig(0, "echo", "none", ["latent"], ["latent"], replicas=2, cpus=["0", "x"])
    stage = OmniStageConfig(
        0, "echo", "none", ["latent"], ["latent"], replicas=2, devices=["3", "4"], cpus="1"
    )
    assert [(r.devices, r.cpus) for r in map(stage.for_replica, (0, 1))] == [("3", "1"), ("4", "1")]
    assert stage.replica_label(1) == "stage 0 (echo) replica 1"


def test_two_dit_replicas_draw_what_one_draws_and_both_work():
    sd3 = tiny_model_path("sd3")
    prompts = [f"a small red cube, number {i}" for i in range(6)]
    params = [{"seed": i} for i in range(6)]
    one = OmniLLM([create_dit_stage_config(0, sd3, **FAST_DIT)])
    try:
        expected = one.generate(prompts, params, use_tqdm=False)
    finally:
        one.close()
    two = OmniLLM([create_dit_stage_config(0, sd3, replicas=2, cpus=["0", "1"], **FAST_DIT)])
    try:
        outputs = two.generate(prompts, params, use_tqdm=False)
        assert [o.error for o in outputs] == [None] * len(prompts)
        # Each replica runs its own batches with one thread: float sums in another order, at most 1/255.
        for got, want in zip(outputs, expected, strict=True):
            difference = np.abs(np.asarray(got.images[0], np.int16) - np.asarray(want.images[0], np.int16))
            assert difference.max() <= 1
        steps = [two.manager.stage_metrics(0, replica).step_seconds.count for replica in (0, 1)]
        assert min(steps) > 0, f"each replica should have run steps, got {steps}"
        pids = [handle.process.pid for handle in two.manager.running.handles]
        assert [psutil.Process(pid).cpu_affinity() for pid in pids] == [[0], [1]]
        stats = two.stage_stats(0)
        assert stats["replicas"] == 2 and stats["executor"] == "native"
    finally:
        two.close()


def test_a_killed_replica_fails_only_its_requests():
    sd3 = tiny_model_path("sd3")
    omni = OmniLLM([create_dit_stage_config(0, sd3, replicas=2, **FAST_DIT)])
    try:
        victim = omni.manager.running.handles[1].process.pid
        slow = {"num_inference_steps": SLOW_STEPS}
        threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        # Requests go to the replica with the fewest in it: 0, 1, 0, 1. Replica 0's finish (2 steps), then
        # replica 1 dies holding its slow ones.
        outputs = omni.generate(["a", "b", "c", "d"], [{}, slow, {}, slow], use_tqdm=False)
        assert time.monotonic() - start < 10
        assert [o.error for o in outputs[::2]] == [None, None]
        for failed in outputs[1::2]:
            assert failed.error.startswith("stage 0 (dit) replica 1 exited with code -9")
        assert omni.manager.dead is None and list(omni.manager.dead_replicas) == [1]
        again = omni.generate(["e", "f"], use_tqdm=False)  # the replica left serves everything
        assert [o.error for o in again] == [None, None]
        assert omni.stage_stats(0)["replicas"] == 1
    finally:
        omni.close()
