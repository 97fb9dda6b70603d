"""OmniLLM with one DiT stage, and the diffusers black-box executor against the native engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.diffusion.conftest import GUIDANCE, run_all
from tests.diffusion.test_dit_engine import init_image
from vllm_omni.config.stage import create_dit_stage_config
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.entrypoints.omni_llm import OmniLLM
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine


@pytest.fixture(scope="module")
def omni(dit_path):
    stage = create_dit_stage_config(
        0, dit_path, ["text"], ["image"], num_inference_steps=3, height=32, width=32
    )
    pipeline = OmniLLM([stage])
    yield pipeline
    pipeline.close()


def test_generate_returns_images_in_order(omni):
    outputs = omni.generate(
        [{"prompt": "A beautiful landscape"}, "The cat sat on the mat"],
        [Params(seed=1), {"seed": 2, "num_inference_steps": 2}],
        use_tqdm=False,
    )
    assert [type(o) for o in outputs] == [OmniRequestOutput] * 2
    assert outputs[0].prompt == {"prompt": "A beautiful landscape"}
    for out, steps in zip(outputs, (3, 2), strict=True):
        assert out.error is None and isinstance(out.images[0], Image.Image)
        assert out.stage_outputs[0].num_steps == steps
    again = omni.generate("A beautiful landscape", {"seed": 1}, use_tqdm=False)[0]
    # same seed, alone instead of in a batch of two: uint8 images at most one level apart
    pixels = [np.asarray(image.images[0], dtype=int) for image in (again, outputs[0])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_bad_prompt_fails_the_call_and_leaves_nothing_queued(omni):
    with pytest.raises(ValueError, match="height must be a multiple of"):
        omni.generate(["fine", "bad"], [{"seed": 1}, {"height": 31}], use_tqdm=False)
    stats = omni.stage_stats(0)
    assert (stats["running"], stats["waiting"], stats["states"]) == (0, 0, 0)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        omni.generate(["a", "b"], [{"seed": 1}], use_tqdm=False)


def test_stage_config_validation(dit_path):
    # (other kinds, e.g. the tests' echo, may be registered too)
    with pytest.raises(ValueError, match=r"stage 0: engine_type must be one of \['ar', 'dit'.*\], got 'gan'"):
        create_dit_stage_config(0, dit_path).__class__(stage_id=0, engine_type="gan", model_path=dit_path)
    with pytest.raises(ValueError, match=r"stage 1: output_modalities must be a non-empty list"):
        create_dit_stage_config(1, dit_path, ["text"], ["video"])
    with pytest.raises(ValueError, match=r"DiTConfig: unknown key\(s\) \['steps'\]"):
        create_dit_stage_config(0, dit_path, steps=3)


def test_diffusers_executor_matches_native_engine(dit_family, dit_path, dit_engine):
    """The black-box path batches requests with equal arguments in one call; images equal the native ones."""
    executor = create_diffusion_engine(dit_path, dit_engine.config.__class__(use_diffusers=True))
    g = GUIDANCE[dit_family]
    requests = [
        ("e0", {"prompt": "A beautiful landscape", "negative_prompt": "blurry"}, dict(seed=1)),
        ("e1", "The cat sat on the mat", dict(seed=2)),
        ("e2", {"prompt": "a red sunset", "image": init_image()}, dict(seed=3, strength=0.8)),
    ]
    for engine in (executor, dit_engine):
        for rid, prompt, extra in requests:
            params = Params(height=32, width=32, num_inference_steps=3, guidance_scale=g, output_type="np",
                            **extra)  # fmt: skip
            engine.add_request(rid, prompt, params)
    first_call = executor.step()
    assert sorted(o.request_id for o in first_call) == ["e0", "e1"]  # equal arguments: one call
    ours = {o.request_id: o for o in first_call} | run_all(executor)
    native = run_all(dit_engine)
    for rid, _, _ in requests:
        assert ours[rid].error is None
        assert np.abs(ours[rid].images - native[rid].images).max() < 1e-3, rid


def test_diffusers_executor_refuses_what_it_cannot_do(dit_path):
    from vllm_omni.config.dit import DiTConfig

    executor = create_diffusion_engine(dit_path, DiTConfig(use_diffusers=True))
    with pytest.raises(ValueError, match="return_latents is not available with the diffusers executor"):
        executor.add_request("x", "a", Params(return_latents=True))
    with pytest.raises(ValueError, match="the diffusers executor runs the folder's own scheduler"):
        executor.add_request("x", "a", Params(sampler="FlowMatchEulerDiscreteScheduler"))
    with pytest.raises(ValueError, match=r"height must be a multiple of \d+ for \w+, got 31"):  # shared check
        executor.add_request("bad", "a", Params(height=31, width=32, num_inference_steps=1))
    executor.add_request("aborted", "a", Params(height=32, width=32, num_inference_steps=1))
    executor.abort_request("aborted")
    assert run_all(executor)["aborted"].error == "aborted"


def test_image_to_image_pipeline_equals_the_stages_by_hand(dit_path, dit_engine):
    size = dict(num_inference_steps=3, height=32, width=32)
    t2i = create_dit_stage_config(0, dit_path, ["text"], ["image"], final_output=False, **size)
    i2i = create_dit_stage_config(1, dit_path, ["text", "image"], ["image"], **size)
    omni = OmniLLM([t2i, i2i], keep_stage_outputs=True)  # the handed-on image is compared below
    try:
        params = [{"seed": 1}, {"seed": 2, "strength": 0.7, "output_type": "np"}]
        out = omni.generate({"prompt": "a red sunset"}, params, use_tqdm=False)[0]
    finally:
        omni.close()
    dit_engine.add_request("h1", "a red sunset", Params(seed=1, **size))
    first, handed_on = run_all(dit_engine)["h1"].images[0], out.stage_outputs[0].images[0]
    # uint8 images: float noise of another batch layout may round one level apart
    assert np.abs(np.asarray(handed_on, dtype=int) - np.asarray(first, dtype=int)).max() <= 1
    dit_engine.add_request("h2", {"prompt": "a red sunset", "image": handed_on}, Params(seed=2, strength=0.7,
                           output_type="np", **size))  # fmt: skip
    second = run_all(dit_engine)["h2"]
    assert out.error is None and out.stage_outputs[1].num_steps == second.num_steps
    assert np.abs(out.images - second.images).max() < 1e-5


def test_pipeline_from_yaml(tmp_path, dit_path, monkeypatch):
    monkeypatch.setenv("OMNI_TEST_DIT", dit_path)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "stages:\n"
        "  - stage_id: 0\n"
        "    engine_type: dit\n"
        "    model_path: ${OMNI_TEST_DIT}\n"
        "    input_modalities: [text]\n"
        "    output_modalities: [image]\n"
        "    dit_config: {num_inference_steps: 2, height: 32, width: 32}\n"
    )
    omni = OmniLLM(str(path))
    try:
        assert omni.stages[0].dit_config.num_inference_steps == 2 and omni.stages[0].model_path == dit_path
        out = omni.generate("a red sunset", {"seed": 3}, use_tqdm=False)[0]
    finally:
        omni.close()
    assert out.error is None and out.stage_outputs[0].num_steps == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage: []\n", r"a pipeline file holds a 'stages' list"),
        ("stages: []\nextra: 1\n", r"unknown top-level key\(s\) \['extra'\]"),
        ("stages:\n  - stage_id: 0\n    engine: dit\n", r"stage 0: unknown key\(s\) \['engine'\]"),
        ("stages:\n  - 3\n", r"stages\[0\] must be a mapping"),
        ("stages:\n  - {stage_id: 0, engine_type: dit, model_path: x, dit_config: {steps: 2}}\n",
         r"DiTConfig: unknown key\(s\) \['steps'\]"),
    ],
)  # fmt: skip
def test_yaml_errors_name_the_stage_and_key(tmp_path, text, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        OmniLLM(path)
