"""Latents in and out: a schedule cut at ``denoising_end`` and continued from its latents at
``denoising_start`` equals the uncut run, in one engine and from stage to stage; latents as the start noise
and as clean image-to-image latents equal diffusers' own pipelines given them; bad latents and combinations
are refused; ``latent`` as a stage modality (tiny real pipelines on CPU)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.diffusion.conftest import GUIDANCE, run_all
from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.latents import denoising_range
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.entrypoints.omni_params import pipeline_params
from vllm_omni.pipeline.stage_input import check_pipeline, stage_input_of
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine, create_diffusion_engine

PROMPT = {"prompt": "a red sunset over the sea", "negative_prompt": "blurry"}
LATENT_SHAPE = (1, 16, 16, 16)  # the tiny families at 32x32: 16 channels, VAE scale factor 2
# Two cuts of the 4-step schedule that leave 2, 1 and 1 steps by diffusers' rule on each family's timesteps
# (SD3, shift 3: 1000, 858, 602, 9; Z-Image: 1000, 900, 750, 500).
CUTS = {"sd3": (0.3, 0.7), "z_image": (0.2, 0.3)}


def small(dit_family: str, **extra) -> Params:
    fields = dict(height=32, width=32, num_inference_steps=4, guidance_scale=GUIDANCE[dit_family], seed=7)
    return Params(**{**fields, **extra})


def run_one(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params)
    out = run_all(engine)[request_id]
    assert out.error is None, out.error
    return out


def test_cut_and_continued_equals_one_run(dit_family, dit_engine):
    """Base (denoising_end) -> continuation (denoising_start, from the base's latents): the final latents
    and image equal the uncut run's, bitwise; so does a three-part split (start and end in the middle
    request). The continuations' own seed differs: they draw no noise."""
    cut, cut2 = CUTS[dit_family]
    full = run_one(dit_engine, "full", PROMPT, small(dit_family, output_type="np", return_latents=True))
    base = run_one(dit_engine, "base", PROMPT, small(dit_family, denoising_end=cut, output_type="latent"))
    assert base.images is None and tuple(base.latents.shape) == LATENT_SHAPE
    other_seed = dict(seed=99, output_type="np", return_latents=True)
    cont = run_one(dit_engine, "cont", {**PROMPT, "latents": base.latents},
                   small(dit_family, denoising_start=cut, **other_seed))  # fmt: skip
    assert (base.num_steps, cont.num_steps) == (2, 2)
    assert torch.equal(cont.latents, full.latents) and np.array_equal(cont.images, full.images)
    middle = small(dit_family, denoising_start=cut, denoising_end=cut2, output_type="latent")
    mid = run_one(dit_engine, "mid", {**PROMPT, "latents": base.latents}, middle)
    last = run_one(dit_engine, "last", {**PROMPT, "latents": mid.latents},
                   small(dit_family, denoising_start=cut2, **other_seed))  # fmt: skip
    assert (mid.num_steps, last.num_steps) == (1, 1)
    assert torch.equal(last.latents, full.latents)


def test_the_cut_is_diffusers_rule(dit_engine):
    """``denoising_range`` starts where diffusers' ``StableDiffusionXLImg2ImgPipeline.get_timesteps`` starts
    for ``denoising_start``, on each family's schedules; the end cut is its complement (SDXL's base)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    family = dit_engine.runner.family
    for steps in (4, 7, 20):
        for fraction in (0.1, 0.3, 0.5, 0.8, 0.95):
            sampler = family.make_sampler("FlowMatchEulerDiscreteScheduler")
            request = types.SimpleNamespace(height=32, width=32, num_inference_steps=steps)
            timesteps = family.set_timesteps(sampler, request)
            theirs, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(
                types.SimpleNamespace(scheduler=sampler), steps, None, "cpu", denoising_start=fraction
            )
            begin, _ = denoising_range(timesteps, 1000, fraction, None)
            assert (begin, len(timesteps) - begin) == (len(timesteps) - count, count)
            assert denoising_range(timesteps, 1000, None, fraction) == (0, begin)


@pytest.mark.parametrize("mode", ["start_noise", "clean_latents_with_strength"])
def test_given_latents_equal_diffusers(dit_family, dit_engine, diffusers_pipes, mode):
    """Latents without ``denoising_start`` are the start noise, diffusers' ``latents=``; with ``strength``
    they are clean latents noised to the strength's first step, diffusers' img2img given latents as its
    ``image``."""
    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(5))
    strength = 0.7 if mode == "clean_latents_with_strength" else None
    ours = run_one(dit_engine, mode, {**PROMPT, "latents": latents}, small(dit_family, strength=strength,
                                                                              output_type="np"))  # fmt: skip
    t2i, i2i = diffusers_pipes
    kwargs = dict(latents=latents.clone()) if strength is None else dict(image=latents.clone(), strength=0.7)
    pipe = t2i if strength is None else i2i
    theirs = pipe(**PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=GUIDANCE[dit_family],
                  generator=torch.Generator().manual_seed(7), output_type="np", **kwargs).images  # fmt: skip
    assert np.abs(ours.images - theirs).max() < 1e-5
    assert ours.num_steps == (4 if strength is None else 3)


def test_bad_latents_are_refused_and_the_engine_serves_on(dit_family, dit_engine):
    family = dit_family
    good = torch.zeros(LATENT_SHAPE)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        ({"latents": torch.zeros(1, 4, 16, 16)}, {},
         rf"latents must have shape \(1, 16, 16, 16\) for {family} at 32x32 \(WxH\), got \(1, 4, 16, 16\)"),
        ({"latents": good}, {"height": 64},
         rf"latents must have shape \(1, 16, 32, 16\) for {family} at 32x64"),
        ({"latents": good[0]}, {}, r"latents must have shape \(1, 16, "),
        ({"latents": good.int()}, {}, "latents must be a floating-point tensor, got dtype torch.int32"),
        ({"latents": nan}, {}, "latents must be finite in the stage's dtype"),
        ({"latents": good.numpy()}, {}, "latents must be a torch.Tensor, got ndarray"),
        ({"latents": good, "image": np.zeros((32, 32, 3))}, {}, "give image or latents"),
        ({}, {"denoising_start": 0.5}, r"denoising_start continues given latents: pass them as prompt\['lat"),
        ({"latents": good}, {"denoising_start": 0.999},
         "denoising_start 0.999 / denoising_end None leave no step of the 4-step schedule"),
    ]  # fmt: skip
    for prompt, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            dit_engine.add_request("bad", {"prompt": "x", **prompt}, Params(height=extra.pop("height", 32),
                                   width=32, num_inference_steps=4, **extra))  # fmt: skip
    stats = dit_engine.memory_stats()
    assert (stats["waiting"], stats["waiting_bytes"], stats["running_bytes"]) == (0, 0, 0)
    out = run_one(
        dit_engine, "after", {"prompt": "x", "latents": good}, Params(num_inference_steps=2, seed=1)
    )
    assert out.images[0].size == (32, 32)  # the size comes from the latents


def test_refused_combinations_name_the_fields():
    for fields, message in (
        (dict(denoising_start=0.5, strength=0.5), "denoising_start and strength both say where"),
        (
            dict(denoising_start=0.6, denoising_end=0.6),
            r"denoising_start \(0.6\) must be below denoising_end",
        ),
        (dict(denoising_start=1.0), r"denoising_start must be in \[0, 1\), got 1.0"),
        (dict(denoising_end=0), r"denoising_end must be in \(0, 1\], got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            Params(**fields)


@pytest.mark.parametrize("dit_family", ["sd3"], indirect=True)  # Z-Image has no second-order sampler
def test_a_second_order_sampler_is_not_cut(dit_engine):
    params = Params(height=32, width=32, num_inference_steps=4, sampler="FlowMatchHeunDiscreteScheduler",
                    denoising_end=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler is a second-order sampler"):
        dit_engine.add_request("heun", "x", params)


def test_the_diffusers_executor_refuses_latents_in(dit_path):
    executor = create_diffusion_engine(dit_path, DiTConfig(executor="diffusers"))
    for prompt, fields, message in (
        (
            {"latents": torch.zeros(LATENT_SHAPE)},
            {},
            "latents: the diffusers executor runs whole pipeline calls",
        ),
        ({}, {"denoising_end": 0.5}, "denoising_end: the diffusers executor runs whole pipeline calls"),
    ):
        with pytest.raises(ValueError, match=message):
            executor.add_request("r", {"prompt": "x", **prompt}, Params(**fields))
        with pytest.raises(ValueError, match=message):  # the manager's check before any stage computes
            executor.limits.check_request(Params(**fields), False, has_latents="latents" in prompt)
    assert executor.memory_stats() == {"waiting": 0, "waiting_bytes": 0}


def test_aborted_requests_keep_no_latents(dit_family, dit_engine):
    latents = torch.randn(LATENT_SHAPE)
    for request_id in ("waiting", "running"):
        dit_engine.add_request(request_id, {"prompt": "x", "latents": latents}, small(dit_family))
    assert dit_engine.memory_stats()["waiting_bytes"] == 2 * latents.nbytes
    dit_engine.abort_request("waiting")
    outputs = {o.request_id: o for o in dit_engine.step()}  # "running" joins the batch and steps once
    assert dit_engine.runner.states["running"].request.latents is None  # its state owns them
    dit_engine.abort_request("running")
    outputs |= run_all(dit_engine)
    assert {outputs[i].error for i in ("waiting", "running")} == {"aborted"}
    stats = dit_engine.memory_stats()
    assert (stats["states"], stats["waiting_bytes"], stats["running_bytes"]) == (0, 0, 0)


def test_dit_to_dit_hand_off_equals_one_engine():
    """OmniLLM: SD3 stage 0 (``latent`` out, denoising_end) -> SD3 stage 1 (``latent`` in: the ``latents``
    stage input, denoising_start): the image equals one engine's run of every step with the same seed."""
    path, size = tiny_model_path("sd3"), dict(num_inference_steps=4, height=32, width=32)
    base = create_dit_stage_config(0, path, ["text"], ["latent"], final_output=False, **size)
    cont = create_dit_stage_config(1, path, ["latent"], ["image"], **size)
    params = [{"seed": 7, "guidance_scale": 5.0, "denoising_end": 0.3},
              {"seed": 7, "guidance_scale": 5.0, "denoising_start": 0.3, "output_type": "np"}]  # fmt: skip
    omni = OmniLLM([base, cont])
    try:  # one request at a time: alone in each stage's batch, as in the reference
        outputs = [omni.generate(prompt, params, use_tqdm=False)[0] for prompt in (PROMPT, "a cat")]
    finally:
        omni.close()
    engine = DiffusionEngine(path, DiTConfig(**size))
    for prompt, out in zip((PROMPT, "a cat"), outputs, strict=True):
        assert out.error is None and out.stage_outputs[1].num_steps == 2
        alone = run_one(engine, "one", prompt, Params(seed=7, guidance_scale=5.0, output_type="np"))
        assert np.array_equal(out.images, alone.images)


def test_latent_is_a_modality_where_it_works():
    """A dit stage with ``latent`` in takes the ``latents`` stage input by default (fed by a stage that
    makes latents) and one with ``latent`` out returns them; an ``ar`` stage consumes no latents."""
    dit_path = tiny_model_path("sd3")
    base = create_dit_stage_config(0, dit_path, ["text"], ["latent"])
    cont = create_dit_stage_config(1, dit_path, ["latent"], ["image"])
    check_pipeline([base, cont])
    assert stage_input_of([base, cont], cont) == "latents"
    both = create_dit_stage_config(0, dit_path, ["text"], ["image", "latent"])
    (first,), (second,) = pipeline_params([base], None, 1, False), pipeline_params([both], None, 1, False)
    assert (first[0].output_type, second[0].output_type, second[0].return_latents) == ("latent", "pil", True)
    consumes = r"stage 0: a 'ar' stage consumes \['text', 'image', 'hidden_states'\], not \['latent'\]"
    with pytest.raises(ValueError, match=consumes):
        create_ar_stage_config(0, tiny_model_path("qwen3"), ["latent"])
    ar = create_ar_stage_config(0, tiny_model_path("qwen3"))
    with pytest.raises(ValueError, match=r"stage 1: input \['latent'\] needs stage 0 to be an 'dit'"):
        check_pipeline([ar, cont])
