"""DiTLimits: one request validator for the native engine and the diffusers executor, published as plain data
a torch-free process can check parameters with; the stats each engine reports (tiny real pipelines, CPU)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.diffusion.conftest import run_all
from tests.diffusion.test_dit_engine import init_image
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.cache_manager import value_nbytes
from vllm_omni.diffusion.limits import DiTLimits
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

SMALL = dict(height=32, width=32, num_inference_steps=2, output_type="np")


@pytest.fixture(scope="module")
def executor(dit_path):
    return create_diffusion_engine(
        dit_path, DiTConfig(use_diffusers=True, max_batch_size=4, max_waiting_requests=8)
    )


def test_both_engines_publish_their_limits(dit_family, dit_engine, executor):
    """Same folder and stage settings: the same sizes, queue bound and inpainting; the executor takes no
    sampler and no return_latents. The limits survive pickling (they travel to the pipeline manager)."""
    native, black_box, family = dit_engine.limits, executor.limits, dit_engine.runner.family
    assert isinstance(native, DiTLimits) and isinstance(black_box, DiTLimits)
    shared = dict(name=dit_family, size_factor=family.size_factor, max_height=2048, max_width=2048,
                  height=None, width=None, max_batch_size=4, max_waiting_requests=8,
                  model_max_size=family.max_size, inpainting=True)  # fmt: skip
    assert native == DiTLimits(**shared, samplers=family.samplers, step_level=True)
    assert black_box == DiTLimits(**shared, samplers=(), step_level=False)
    assert native.max_num_requests == black_box.max_num_requests == 12
    assert pickle.loads(pickle.dumps(native)) == native
    if dit_family == "sd3":  # its position embedding: 32 patches of 4 pixels per side in the tiny model
        assert native.model_max_size == 128
        with pytest.raises(ValueError, match=r"height 256 exceeds what sd3 takes \(128\)"):
            native.check_size(256, 64)


def refusals(family: str, kind: str) -> list[tuple[dict, str]]:
    """(params, the exact message) that ``kind`` refuses whatever the prompt."""
    size = [
        (dict(height=30, width=32), f"height must be a multiple of 4 for {family}, got 30"),
        (dict(height=32, width=4096), "width 4096 exceeds the stage's maximum (DiTConfig.max_width=2048)"),
    ]
    if kind == "native":
        allowed = {"sd3": ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"],
                   "z_image": ["FlowMatchEulerDiscreteScheduler"]}[family]  # fmt: skip
        unsupported = f"sampler 'DDIMScheduler' is not supported by {family}; allowed: {allowed}"
        return [*size, (dict(sampler="DDIMScheduler"), unsupported)]
    return [
        *size,
        (dict(sampler="FlowMatchEulerDiscreteScheduler"),
         "sampler: the diffusers executor runs the folder's own scheduler; leave it unset"),
        (dict(return_latents=True),
         f"return_latents is not available with the diffusers executor ({family}); use output_type='latent'"),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["native", "diffusers"])
def test_check_params_refuses_what_add_request_refuses(dit_family, dit_engine, executor, kind):
    """``limits.check_params`` and ``add_request`` raise the same exact messages; nothing is queued."""
    engine = {"native": dit_engine, "diffusers": executor}[kind]
    for values, message in refusals(dit_family, kind):
        params = Params(**{**SMALL, **values})
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            engine.limits.check_params(params)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            engine.add_request("bad", "a red sunset", params)
    assert not engine.has_unfinished_requests()


def test_configured_sizes_are_checked_too(dit_engine):
    """A size the stage would default to (DiTConfig.height/width) is checked as if the request asked."""
    limits = dataclasses.replace(dit_engine.limits, height=30, max_width=64, width=128)
    with pytest.raises(ValueError, match=r"^height must be a multiple of 4 for \w+, got 30$"):
        limits.check_params(Params())
    limits = dataclasses.replace(limits, height=None)
    with pytest.raises(
        ValueError, match=re.escape("width 128 exceeds the stage's maximum (DiTConfig.max_width=64)")
    ):
        limits.check_params(Params())
    limits.check_params(Params(width=64))  # the request's own size wins


def test_the_init_image_size_is_checked_when_added(dit_family, dit_engine):
    """Image-to-image without a size runs at the image's size: unknown to check_params, refused when added."""
    dit_engine.limits.check_params(Params(strength=0.5))
    with pytest.raises(ValueError, match=f"^height must be a multiple of 4 for {dit_family}, got 30$"):
        dit_engine.add_request("bad", {"prompt": "x", "image": init_image(30)}, Params(strength=0.5))
    assert not dit_engine.has_unfinished_requests()


def test_limits_are_checked_without_torch(dit_engine, executor):
    """A process that cannot import torch, diffusers, transformers, numpy or PIL unpickles the limits and
    checks parameters with them."""
    code = textwrap.dedent("""
        import pickle, sys
        for name in ("torch", "diffusers", "transformers", "numpy", "PIL"):
            sys.modules[name] = None  # any import of them fails
        from vllm_omni.diffusion.request import DiffusionSamplingParams
        for limits in pickle.loads(sys.stdin.buffer.read()):
            limits.check_params(DiffusionSamplingParams(height=32, seed=1))
            try:
                limits.check_params(DiffusionSamplingParams(height=30))
            except ValueError as exc:
                print(exc)
    """)
    limits = pickle.dumps([dit_engine.limits, executor.limits])
    result = subprocess.run([sys.executable, "-c", code], input=limits, capture_output=True, check=True)
    name = dit_engine.limits.name
    assert result.stdout.decode().splitlines() == [f"height must be a multiple of 4 for {name}, got 30"] * 2


def test_the_executor_holds_at_most_max_num_requests(dit_path):
    executor = create_diffusion_engine(
        dit_path, DiTConfig(use_diffusers=True, max_batch_size=1, max_waiting_requests=1)
    )
    for i in range(2):
        executor.add_request(f"q{i}", "x", Params(**SMALL))
    message = "the waiting queue is full: the stage holds 2 requests (DiTConfig.max_batch_size 1 + "
    with pytest.raises(ValueError, match=re.escape(message) + "max_waiting_requests 1"):
        executor.add_request("q2", "x", Params(**SMALL))
    assert len(run_all(executor)) == 2


def test_stats_report_what_each_engine_holds(dit_engine, executor):
    """Waiting requests hold their conditioning tensors and init images; the executor reports only that
    (no running batch, states or cache between its pipeline calls), the native engine its states too."""
    with torch.inference_mode():
        given = dit_engine.runner.family.encode(["a red sunset"])[0]
    keys = dit_engine.runner.family.embeds_keys
    embeds = dict(zip(keys, given if isinstance(given, tuple) else (given,), strict=True))
    held = value_nbytes(given) + 32 * 32 * 3  # float32 tensors as given, and an RGB image's pixels
    for engine in (executor, dit_engine):
        engine.add_request("embeds", embeds, Params(**SMALL, guidance_scale=0.0))
        engine.add_request("image", {"prompt": "x", "image": init_image(32)}, Params(**SMALL, strength=1.0))
        assert engine.memory_stats()["waiting"] == 2 and engine.memory_stats()["waiting_bytes"] == held
    assert executor.memory_stats() == {"waiting": 2, "waiting_bytes": held}
    dit_engine.step()
    stats = dit_engine.memory_stats()
    assert (stats["running"], stats["waiting"], stats["waiting_bytes"], stats["states"]) == (2, 0, 0, 2)
    assert stats["running_bytes"] > 0 and stats["cache_bytes"] >= 0
    run_all(executor), run_all(dit_engine)
    assert executor.memory_stats() == {"waiting": 0, "waiting_bytes": 0}
    assert dit_engine.memory_stats()["states"] == dit_engine.memory_stats()["running_bytes"] == 0


def test_a_pipeline_without_a_native_family_keeps_its_own_size_check(tmp_path):
    """StableDiffusion3PAGPipeline (no native family) on the tiny SD3 weights: the executor refuses no size
    (size_factor 1); the pipeline's own check fails that request alone, in its call."""
    source = Path(tiny_model_path("sd3"))
    for component in source.iterdir():
        if component.name != "model_index.json":
            (tmp_path / component.name).symlink_to(component)
    index = json.loads((source / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if v != [None, None]} | {
        "_class_name": "StableDiffusion3PAGPipeline"
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    executor = create_diffusion_engine(str(tmp_path), DiTConfig(use_diffusers=True))
    assert (executor.limits.name, executor.limits.size_factor) == ("StableDiffusion3PAGPipeline", 1)
    executor.add_request("odd", "x", Params(**{**SMALL, "height": 30}))
    executor.add_request("fine", "x", Params(**SMALL))
    outputs = run_all(executor)
    assert outputs["odd"].error.startswith("ValueError: `height` and `width` have to be divisible by 4")
    assert outputs["fine"].error is None and outputs["fine"].images.shape == (1, 32, 32, 3)
