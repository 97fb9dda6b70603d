"""One GPU for AR and DiT stages: the DiT stage's memory estimate, the split of a pretend device, the refusal
when the stages do not fit, and ``DiTConfig.memory_budget`` bounding the running batch."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.stage import create_ar_stage_config, create_dit_stage_config
from vllm_omni.diffusion.memory import DiTMemoryEstimate
from vllm_omni.pipeline.memory_plan import MARGIN_BYTES, dit_need, plan_memory, split_device
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

GIB, MIB = 1 << 30, 1 << 20
SD3_MEDIUM = DiTMemoryEstimate(
    weight_bytes=0, dtype_bytes=2, scale_factor=8, patch_size=2, hidden_width=24 * 64, vae_channels=128,
    default_height=1024, default_width=1024,
)  # fmt: skip
"""SD3-medium's shapes (24 heads x 64, patch 2, VAE 8x with 128 channels) in bfloat16."""


@pytest.fixture(scope="module")
def sd3() -> Path:
    return Path(tiny_model_path("sd3"))


def _stored_bytes(folder: Path) -> int:
    """The tensor bytes of a folder's safetensors files: file size minus the 8-byte length and the header."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
        total += path.stat().st_size - 8 - length
    return total


def test_weights_are_the_safetensors_tensors_at_the_stage_dtype(sd3):
    float32 = DiTMemoryEstimate.from_folder(sd3, DiTConfig())
    bfloat16 = DiTMemoryEstimate.from_folder(sd3, DiTConfig(dtype="bfloat16"))
    assert float32.weight_bytes == _stored_bytes(sd3)  # the tiny checkpoint is stored in float32
    assert bfloat16.weight_bytes == float32.weight_bytes // 2
    # The tiny SD3: VAE 2x (two blocks of 16, 32 channels), patch 2, 2 heads x 32, sample_size 32 -> 64 px.
    assert (float32.scale_factor, float32.patch_size, float32.hidden_width) == (2, 2, 64)
    assert (float32.vae_channels, float32.default_height) == (16, 64)


def test_working_memory_of_one_request():
    # 1024 px: 64 x 64 = 4096 image tokens + 512 text tokens, 2 rows under guidance.
    denoiser = 2 * (4096 + 512) * 1536 * 16 * 2  # 432 MiB
    decode = 1024 * 1024 * 128 * 6 * 2  # 1.5 GiB: the VAE decode is the peak at this size
    assert SD3_MEDIUM.request_bytes() == max(denoiser, decode) == 3 * GIB // 2
    assert SD3_MEDIUM.request_bytes(512, 512) == 512 * 512 * 128 * 6 * 2  # 384 MiB: a quarter
    wide = dataclasses.replace(SD3_MEDIUM, hidden_width=8192)  # where the denoiser is the peak
    assert wide.request_bytes() == 2 * (4096 + 512) * 8192 * 16 * 2  # 2.25 GiB
    assert wide.request_bytes(guided=False) == decode  # one row: 1.125 GiB, under the decode's 1.5


def test_split_of_a_pretend_device(sd3):
    config = DiTConfig(dtype="bfloat16", max_batch_size=4)
    need = dit_need("stage 1 (dit)", DiTMemoryEstimate.from_folder(sd3, config), config)
    per_request = 2 * (16 * 16 + 512) * 64 * 16 * 2  # 64 px: 16 x 16 image tokens; 3 MiB
    assert need.request_bytes == per_request and need.working_bytes == 4 * per_request
    assert need.total_bytes == _stored_bytes(sd3) // 2 + 4 * per_request + 256 * MIB
    split = split_device("0", 16 * GIB, [need], {"stage 0 (ar)": None})
    free = 16 * GIB - need.total_bytes - MARGIN_BYTES  # ~13.7 GiB
    assert (
        split.ar_shares == {"stage 0 (ar)": int(free / (16 * GIB) * 1000) / 1000} == {"stage 0 (ar)": 0.858}
    )
    assert "GPU 0 (16.00 GiB)" in split.describe() and "stage 0 (ar) gpu_memory_utilization 0.858" in (
        split.describe()
    )
    # An explicit value wins; two ar stages without one share what is left.
    assert split_device("0", 16 * GIB, [need], {"a": 0.5}).ar_shares == {"a": 0.5}
    assert split_device("0", 16 * GIB, [need], {"a": 0.5, "b": None}).ar_shares == {"a": 0.5, "b": 0.358}


def test_refused_when_the_stages_do_not_fit(sd3):
    config = DiTConfig(memory_budget=4 * GIB)
    need = dit_need("stage 1 (dit)", DiTMemoryEstimate.from_folder(sd3, config), config)
    with pytest.raises(ValueError, match=r"do not fit on GPU 0 \(6.00 GiB\): stage 1 \(dit\) 4.25 GiB"):
        split_device("0", 6 * GIB, [need], {"stage 0 (ar)": None})  # 4.25 + 2 margin > 6
    with pytest.raises(ValueError, match="stage 0 \\(ar\\) gpu_memory_utilization 0.5"):
        split_device("0", 12 * GIB, [need], {"stage 0 (ar)": 0.5})  # 4.25 + 2 + 6 > 12


def test_plan_sets_both_stages_on_a_shared_device_only(sd3, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    qwen3 = tiny_model_path("qwen3")
    ar, dit = create_ar_stage_config(0, qwen3), create_dit_stage_config(1, str(sd3), max_batch_size=2)
    planned = plan_memory([ar, dit], device_bytes=lambda device: 16 * GIB)
    assert planned[0].engine_args == {"gpu_memory_utilization": 0.858}
    need = dit_need(dit.label, DiTMemoryEstimate.from_folder(sd3, dit.dit_config), dit.dit_config)
    assert planned[1].dit_config.memory_budget == need.working_bytes == 2 * need.request_bytes
    assert ar.engine_args == {} and dit.dit_config.memory_budget is None  # the caller's configs unchanged
    # Explicit values are kept; stages on different devices, a CPU DiT, or no GPU at all: nothing to plan.
    explicit = create_ar_stage_config(0, qwen3, gpu_memory_utilization=0.3)
    assert plan_memory([explicit, dit], lambda device: 16 * GIB)[0].engine_args == {
        "gpu_memory_utilization": 0.3
    }
    apart = [create_ar_stage_config(0, qwen3, devices="0"), create_dit_stage_config(1, str(sd3), devices="1")]
    on_cpu = [ar, create_dit_stage_config(1, str(sd3), device="cpu")]
    for stages in (apart, on_cpu):
        assert plan_memory(stages, lambda device: 1) == stages
    assert plan_memory([ar, dit]) == [ar, dit]  # this machine has no GPU


def test_memory_budget_bounds_the_running_batch(sd3):
    estimate = DiTMemoryEstimate.from_folder(sd3, DiTConfig())
    per_request = estimate.request_bytes()  # 64 px, guided: SD3's default guidance is 7
    engine = DiffusionEngine(str(sd3), DiTConfig(max_batch_size=8, memory_budget=3 * per_request // 2))
    for i in range(4):
        engine.add_request(f"r{i}", "a cat", _params(seed=i))
    engine.step()
    assert engine.scheduler.num_requests() == (1, 3)  # 1.5 requests' worth: one runs, the others wait
    # 128 px: 32 x 32 image tokens + 512 text tokens, twice the default's 16 x 16 + 512.
    assert estimate.request_bytes(128, 128) == 2 * per_request
    with pytest.raises(ValueError, match="128x128 request needs .* over DiTConfig.memory_budget"):
        engine.add_request("big", "a cat", _params(height=128, width=128))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert sorted(outputs) == ["r0", "r1", "r2", "r3"] and not any(o.error for o in outputs.values())


def _params(**fields):
    from vllm_omni.diffusion.request import DiffusionSamplingParams

    return DiffusionSamplingParams(num_inference_steps=2, **fields)


def test_the_worked_example_of_the_docs():
    """docs/features/omni_pipelines.md, "One GPU for AR and DiT stages": SD3-medium in bfloat16 (its weights
    taken as 14.5 GiB) with max_batch_size 8 beside an ar stage on an 80 GiB device."""
    config = DiTConfig(dtype="bfloat16")
    need = dit_need("stage 1 (dit)", dataclasses.replace(SD3_MEDIUM, weight_bytes=29 * GIB // 2), config)
    assert need.total_bytes == 29 * GIB // 2 + 8 * 3 * GIB // 2 + GIB // 4  # 26.75 GiB
    split = split_device("0", 80 * GIB, [need], {"stage 0 (ar)": None})
    assert split.ar_shares == {"stage 0 (ar)": 0.64}  # (80 - 26.75 - 2) / 80 = 0.640625
    text = (Path(__file__).parents[2] / "docs/features/omni_pipelines.md").read_text()
    assert "(80 - 26.75 - 2) / 80 = 0.6406" in text


def test_memory_budget_bounds_the_diffusers_executors_calls():
    from vllm_omni.v1.executor.diffusers_executor import DiffusersPipelineExecutor

    sd2 = tiny_model_path("sd2")  # a UNet pipeline: the diffusers executor
    per_request = DiTMemoryEstimate.from_folder(sd2, DiTConfig()).request_bytes()  # guided: always counted
    executor = DiffusersPipelineExecutor(sd2, DiTConfig(max_batch_size=8, memory_budget=5 * per_request // 2))
    for i in range(4):
        executor.add_request(f"r{i}", "a cat", _params(seed=i))
    assert sorted(o.request_id for o in executor.step()) == ["r0", "r1"]  # one call of two, two wait
    assert len(executor.waiting) == 2
