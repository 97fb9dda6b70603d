"""Pipelines without a native family run by default (DiTConfig.executor 'auto' -> the diffusers executor) and
equal the diffusers pipeline's own call; executor selection and its errors."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

from tests.diffusion.conftest import run_all
from tests.diffusion.test_dit_engine import init_image
from tests.diffusion.test_inpainting import edit_mask
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.models import select_executor
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

# Per family: the size it runs at, its guidance (on for the CFG families; FLUX: the embedded guidance) and
# whether it has image-to-image and inpainting pipelines (these families have both or neither). PixArt bins
# sizes to 256-pixel tables: it runs at 256.
FAMILIES = {
    "sd2": dict(size=32, guidance=7.5, img2img=True),
    "pixart_sigma": dict(size=256, guidance=4.5, img2img=False),
    "flux": dict(size=32, guidance=3.5, img2img=True),
}
STEPS = 3
REQUESTS = [  # (id, prompt, seed): batched into one pipeline call
    ("a", "A red fox in the park", 1),
    ("b", {"prompt": "The cat sat on the mat", "negative_prompt": "blurry"}, 2),
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, folder, the reference pipeline, the stage engine with the default DiTConfig)."""
    path = tiny_model_path(request.param)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return request.param, path, pipe, create_diffusion_engine(path, DiTConfig())


def reference(pipe, name: str, prompt, seed: int, **kwargs) -> np.ndarray:
    """The pipeline's own call for one request (its prompt dict's keys are the call's arguments)."""
    size, guidance = FAMILIES[name]["size"], FAMILIES[name]["guidance"]
    prompt = prompt if isinstance(prompt, dict) else {"prompt": prompt}
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(**prompt, height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance,
                generator=generator, output_type="np", **kwargs).images[0]  # fmt: skip


def params(name: str, seed: int, **extra) -> Params:
    size, guidance = FAMILIES[name]["size"], FAMILIES[name]["guidance"]
    return Params(height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance, seed=seed,
                  output_type="np", **extra)  # fmt: skip


def test_default_config_runs_the_diffusers_executor_equal_to_the_pipeline(family):
    name, _, pipe, engine = family
    assert (engine.executor, engine.limits.name) == ("diffusers", type(pipe).__name__)
    for request_id, prompt, seed in REQUESTS:
        engine.add_request(request_id, prompt, params(name, seed))
    first_call = engine.step()
    assert sorted(o.request_id for o in first_call) == ["a", "b"]  # equal arguments: one batched call
    outputs = sorted(first_call, key=lambda o: o.request_id)
    for output, (_, prompt, seed) in zip(outputs, REQUESTS, strict=True):
        assert output.error is None and output.seed == seed and output.images[0].std() > 0.02
        diff = np.abs(output.images[0] - reference(pipe, name, prompt, seed)).max()
        print(f"{name} text-to-image, request of seed {seed}: max abs pixel diff {diff:.2e}")
        assert diff <= 1 / 255


def test_image_to_image_where_the_family_has_one(family):
    name, _, pipe, engine = family
    size = FAMILIES[name]["size"]
    prompt = {"prompt": "a red sunset", "image": init_image(size)}
    if not FAMILIES[name]["img2img"]:
        with pytest.raises(ValueError, match=f"image: {type(pipe).__name__} has no image-to-image pipeline"):
            engine.add_request("i2i", prompt, params(name, 3, strength=0.7))
        return
    engine.add_request("i2i", prompt, params(name, 3, strength=0.7))
    (output,) = run_all(engine).values()
    expected = reference(AutoPipelineForImage2Image.from_pipe(pipe), name, prompt, 3, strength=0.7)
    diff = np.abs(output.images[0] - expected).max()
    print(f"{name} image-to-image: max abs pixel diff {diff:.2e}")
    assert output.error is None and diff <= 1 / 255


def test_inpainting_where_the_family_has_one(family):
    """Masked requests with equal arguments run in one call of the family's inpainting pipeline, each equal
    to that pipeline's call for it alone; an unmasked image-to-image request waits for a call of its own.
    A family without one refuses the mask when the request is added, and its limits say so."""
    name, _, pipe, engine = family
    size = FAMILIES[name]["size"]
    masked = [(f"m{seed}", {"prompt": "a red sunset", "image": init_image(size, seed), "mask_image":
               edit_mask(size, (0, 4, size // 2, size))}, seed) for seed in (1, 2)]  # fmt: skip
    if not FAMILIES[name]["img2img"]:
        assert not engine.limits.inpainting
        with pytest.raises(ValueError, match=f"mask_image: {type(pipe).__name__} does not inpaint"):
            engine.add_request("m", masked[0][1], params(name, 1, strength=0.7))
        return
    assert engine.limits.inpainting
    for request_id, prompt, seed in masked:
        engine.add_request(request_id, prompt, params(name, seed, strength=0.7))
    engine.add_request("i2i", {"prompt": "a cat", "image": init_image(size)}, params(name, 3, strength=0.7))
    first_call = {o.request_id: o for o in engine.step()}
    assert sorted(first_call) == ["m1", "m2"] and [o.request_id for o in engine.step()] == ["i2i"]
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    for request_id, prompt, seed in masked:
        expected = reference(inpaint, name, prompt, seed, strength=0.7)
        diff = np.abs(first_call[request_id].images[0] - expected).max()
        print(f"{name} inpainting, request of seed {seed}: max abs pixel diff {diff:.2e}")
        assert first_call[request_id].error is None and diff <= 1 / 255


@pytest.mark.parametrize(
    ("values", "executor"),
    [
        ({}, "auto"),
        ({"executor": "native"}, "native"),
        ({"use_diffusers": True}, "diffusers"),
        ({"use_diffusers": False}, "native"),
        ({"use_diffusers": True, "executor": "diffusers"}, "diffusers"),
    ],
)
def test_executor_and_its_use_diffusers_alias(values, executor):
    assert DiTConfig(**values).executor == executor


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"executor": "black_box"}, "DiTConfig.executor must be one of ['auto', 'native', 'diffusers'], got"),
        ({"use_diffusers": True, "executor": "native"},
         "DiTConfig.use_diffusers=True (executor 'diffusers') contradicts executor='native'"),
        ({"use_diffusers": False, "executor": "diffusers"},
         "DiTConfig.use_diffusers=False (executor 'native') contradicts executor='diffusers'"),
        ({"model_type": "sd3", "executor": "diffusers"}, "DiTConfig.model_type='sd3' names a native family"),
    ],
)  # fmt: skip
def test_executor_config_errors(values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        DiTConfig(**values)


@pytest.mark.parametrize(
    ("class_name", "values", "executor"),
    [
        ("StableDiffusion3Pipeline", {}, "native"),
        ("ZImageImg2ImgPipeline", {}, "native"),
        ("PixArtSigmaPipeline", {}, "diffusers"),
        ("StableDiffusion3Pipeline", {"executor": "diffusers"}, "diffusers"),
        ("StableDiffusion3PAGPipeline", {"model_type": "sd3"}, "native"),
    ],
)
def test_select_executor(class_name, values, executor):
    assert select_executor(class_name, DiTConfig(**values)) == executor


def test_native_refuses_other_families_listing_the_native_ones():
    with pytest.raises(ValueError) as error:
        create_diffusion_engine(tiny_model_path("sd2"), DiTConfig(executor="native"))
    assert str(error.value).startswith(
        "DiTConfig.executor='native': StableDiffusionPipeline has no native runner; native families: "
        "['sd3', 'z_image'] (pipelines ['StableDiffusion3Img2ImgPipeline', 'StableDiffusion3Pipeline', "
    )


def test_the_stage_logs_which_executor_runs(caplog):
    with caplog.at_level(logging.INFO, logger="vllm_omni"):
        engine = create_diffusion_engine(tiny_model_path("sd3"), DiTConfig(max_batch_size=2))
    assert engine.executor == "native"
    line = f"DiT stage {tiny_model_path('sd3')}: StableDiffusion3Pipeline runs on the native executor"
    assert line in caplog.text
