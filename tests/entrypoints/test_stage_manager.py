"""StageManager: tensors through shared memory, stage processes that fail, die or outlive their manager."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch

from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.pipeline.stage_io import SHM_DIR, dumps, loads, new_segment_prefix, sweep
from vllm_omni.pipeline.stage_manager import OmniStageError
from vllm_omni.testing.tiny_models import tiny_model_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW_DIT = dict(num_inference_steps=20_000, height=32, width=32)  # far longer than any wait below


def segments(prefix: str) -> list[str]:
    return [p.name for p in SHM_DIR.glob(f"{prefix}*")]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(512, 1024),  # 2 MiB
        torch.randn(1024, 1024, dtype=torch.bfloat16).t(),  # non-contiguous, 2 MiB
        torch.arange(300_000, dtype=torch.int64),
    ],
)
def test_large_tensors_travel_in_shared_memory_and_are_freed_on_load(tensor):
    prefix = new_segment_prefix()
    message = ("outputs", 0, [("r", {"big": tensor, "small": torch.ones(4)}, True)])
    data = dumps(message, threshold=1 << 20, prefix=prefix)
    assert len(data) < 2048  # a handle, not the bytes
    assert len(segments(prefix)) == 1
    out = loads(data)[2][0][1]
    assert torch.equal(out["big"], tensor) and out["big"].dtype == tensor.dtype
    assert torch.equal(out["small"], torch.ones(4))
    assert segments(prefix) == []
    pickled = pickle.dumps(tensor)
    assert len(dumps(tensor, threshold=tensor.numel() * tensor.element_size() + 1)) >= len(pickled) // 2


def test_without_shared_memory_tensors_are_pickled(monkeypatch, tmp_path):
    import vllm_omni.pipeline.stage_io as stage_io

    monkeypatch.setattr(stage_io, "SHM_DIR", tmp_path / "missing")
    tensor = torch.randn(1 << 19)
    data = dumps(tensor, threshold=1)
    assert len(data) > tensor.numel() * 4 and torch.equal(loads(data), tensor)


def test_sweep_unlinks_what_nobody_loaded():
    prefix = new_segment_prefix()
    dumps(torch.zeros(1 << 18), threshold=1, prefix=prefix)
    dumps(torch.zeros(1 << 18), threshold=1, prefix=prefix)
    assert len(segments(prefix)) == 2
    assert sweep(prefix) == 2 and segments(prefix) == []


@pytest.fixture()
def slow_dit():
    omni = OmniLLM([create_dit_stage_config(0, tiny_model_path("sd3"), devices="5", cpus="1", **SLOW_DIT)])
    yield omni
    omni.close()


def test_device_and_cpu_placement_are_the_stage_process_environment(slow_dit):
    stage = psutil.Process(slow_dit.manager.running.handles[0].process.pid)
    assert stage.environ()["CUDA_VISIBLE_DEVICES"] == "5"
    assert (stage.environ()["OMP_NUM_THREADS"], stage.environ()["VLLM_CPU_OMP_THREADS_BIND"]) == ("1", "1")
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        assert (stage.environ()["OMP_WAIT_POLICY"], stage.environ()["GOMP_SPINCOUNT"]) == ("PASSIVE", "1000")
    assert stage.cpu_affinity() == [1]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "5"  # the parent's is untouched
    with pytest.raises(ValueError, match="stage 0: cpus must list CPU ids like '0-3' or '4,6', got 'a'"):
        create_dit_stage_config(0, tiny_model_path("sd3"), cpus="a")


def test_a_dying_stage_fails_pending_requests_promptly_naming_it(slow_dit):
    stage_pid = slow_dit.manager.running.handles[0].process.pid
    threading.Timer(1.0, os.kill, (stage_pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(OmniStageError, match=r"stage 0 \(dit\) exited with code -9"):
        slow_dit.generate(["a", "b", "c"], {"seed": 1}, use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(OmniStageError, match=r"stage 0 \(dit\)"):
        slow_dit.generate("again", use_tqdm=False)


def test_a_stage_that_cannot_start_is_named_and_nothing_is_left(tmp_path):
    before = set(p.pid for p in psutil.Process().children(recursive=True))
    stages = [create_dit_stage_config(0, str(tmp_path))]  # no model_index.json there
    with pytest.raises(OmniStageError, match=r"stage 0 \(dit\) failed to start"):
        OmniLLM(stages)
    stage_children = [
        p for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]  # fmt: skip
    assert stage_children == []


def test_closing_one_pipeline_leaves_another_pipelines_tensors_alone():
    stage = create_dit_stage_config(0, tiny_model_path("sd3"), num_inference_steps=2, height=32, width=32)
    first, second = OmniLLM([stage], shm_threshold=1), OmniLLM([stage], shm_threshold=1)
    try:
        assert first.manager.running.codec.prefix != second.manager.running.codec.prefix
        first.close()
        out = second.generate("a cat", {"seed": 1, "return_latents": True}, use_tqdm=False)[0]
        assert out.error is None and out.latents is not None  # the latents came through shared memory
        assert segments(second.manager.running.codec.prefix) == []  # consumed on arrival
    finally:
        second.close()


def _start_script(body: str) -> subprocess.Popen:
    script = textwrap.dedent(body)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": REPO}
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _descendant_pids(process: subprocess.Popen, line: str) -> list[psutil.Process]:
    """Wait for ``line`` on the script's stdout; then its process tree (stages, engines)."""
    for out in process.stdout:
        if out.strip() == line:
            break
    else:
        raise AssertionError(f"the script ended before printing {line!r}")
    tree = psutil.Process(process.pid).children(recursive=True)
    return [p for p in tree if "resource_tracker" not in " ".join(p.cmdline())]


def test_a_killed_manager_leaves_no_stage_behind():
    process = _start_script(f"""
        import time
        from vllm_omni import OmniLLM, create_dit_stage_config
        from vllm_omni.testing.tiny_models import tiny_model_path
        if __name__ == "__main__":
            omni = OmniLLM([create_dit_stage_config(0, tiny_model_path("sd3"), **{SLOW_DIT})])
            print("ready", flush=True)
            time.sleep(600)
    """)
    stages = _descendant_pids(process, "ready")
    assert stages
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(stages, timeout=15)
    assert alive == []


@pytest.mark.engine
def test_ctrl_c_stops_every_stage_and_engine():
    process = _start_script(f"""
        import os, threading, time
        from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine core in a process of its own
        from vllm_omni.testing.tiny_models import tiny_model_path

        def say_when_generating(omni):
            while not omni.manager.requests:
                time.sleep(0.01)
            print("generating", flush=True)

        if __name__ == "__main__":
            ar = create_ar_stage_config(0, tiny_model_path("qwen3"), max_model_len=256, enforce_eager=True)
            omni = OmniLLM([ar, create_dit_stage_config(1, tiny_model_path("sd3"), **{SLOW_DIT})])
            threading.Thread(target=say_when_generating, args=(omni,), daemon=True).start()
            omni.generate(["a", "b"], [{{"max_tokens": 4}}, {{"seed": 1}}], use_tqdm=False)
    """)
    tree = _descendant_pids(process, "generating")
    assert len(tree) >= 3  # two stage processes, the AR stage's EngineCore (and its worker)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert process.wait(timeout=90) != 0
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == []


@pytest.mark.engine
def test_close_stops_what_a_killed_ar_stage_left_running(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine core in a process of its own
    stage = create_ar_stage_config(0, tiny_model_path("qwen3"), max_model_len=256, enforce_eager=True)
    omni = OmniLLM([stage])
    stage_pid = omni.manager.running.handles[0].process.pid
    engine_processes = psutil.Process(stage_pid).children(recursive=True)  # EngineCore and its worker
    assert engine_processes
    os.kill(stage_pid, signal.SIGKILL)
    with pytest.raises(OmniStageError, match=r"stage 0 \(ar\) exited with code -9"):
        omni.generate("hi", use_tqdm=False)
    omni.close()
    _, alive = psutil.wait_procs(engine_processes, timeout=10)
    assert alive == []
