"""The native DiT engine against diffusers, and its step-level batching (real tiny pipelines on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.diffusion.conftest import GUIDANCE, run_all
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params

PROMPTS = ("A beautiful landscape with mountains", "The cat sat on the mat", "a red sunset")


def init_image(size: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(size, size, 3)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def reference(pipes, prompt, negative, seed, steps, guidance, size, image=None, strength=None):
    t2i, i2i = pipes
    kwargs = dict(image=image, strength=strength) if image is not None else {}
    pipe = i2i if image is not None else t2i
    out = pipe(
        prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        height=size, width=size, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs,
    )  # fmt: skip
    return out.images[0]


@pytest.mark.parametrize("mode", ["text_to_image", "image_to_image"])
def test_matches_diffusers(dit_family, dit_engine, diffusers_pipes, mode):
    """Same folder, prompt, seed, steps, guidance and sampler: the image equals diffusers' (float32)."""
    guidance, image = GUIDANCE[dit_family], init_image() if mode == "image_to_image" else None
    cases = [(PROMPTS[0], "blurry", 11, 4), (PROMPTS[1], None, 12, 3)]
    for i, (prompt, negative, seed, steps) in enumerate(cases):
        strength = 0.7 if image is not None else None
        dit_engine.add_request(
            f"{mode}-{i}",
            {"prompt": prompt, "negative_prompt": negative, "image": image},
            Params(height=32, width=32, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                   strength=strength, output_type="np"),
        )  # fmt: skip
    outputs = run_all(dit_engine)
    for i, (prompt, negative, seed, steps) in enumerate(cases):
        out = outputs[f"{mode}-{i}"]
        assert out.error is None
        expected = reference(
            diffusers_pipes, prompt, negative, seed, steps, guidance, 32, image, 0.7 if image else None
        )
        assert out.images.shape == (1, 32, 32, 3)
        assert np.abs(out.images[0] - expected).max() < 1e-3
        assert expected.std() > 0.01  # the tiny model draws a non-constant image
        assert out.num_steps == (steps - int(steps - steps * 0.7) if image is not None else steps)


def _alone(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params)
    return run_all(engine)[request_id].images


def test_batch_invariance(dit_family, dit_engine):
    """A request's image is the same alone and batched with others of other seeds, steps, guidance, sizes,
    arriving at other times (and, for image-to-image, with text-to-image neighbours)."""
    g = GUIDANCE[dit_family]
    requests = [
        ("r0", PROMPTS[0], Params(height=32, width=32, num_inference_steps=5, guidance_scale=g, seed=1)),
        ("r1", PROMPTS[1], Params(height=32, width=32, num_inference_steps=3, guidance_scale=0.0, seed=2)),
        ("r2", PROMPTS[2], Params(height=64, width=64, num_inference_steps=4, guidance_scale=g + 1, seed=3)),
        ("r3", {"prompt": PROMPTS[0], "image": init_image(32, 1)},
         Params(num_inference_steps=6, guidance_scale=g, seed=4, strength=0.5)),
    ]  # fmt: skip
    for params in (r[2] for r in requests):
        params.output_type = "np"
    alone = {rid: _alone(dit_engine, f"alone-{rid}", prompt, p) for rid, prompt, p in requests}

    outputs = {}
    dit_engine.add_request(*requests[0])
    dit_engine.add_request(*requests[1])
    for output in dit_engine.step() + dit_engine.step():  # r2, r3 join two steps later
        outputs[output.request_id] = output
    dit_engine.add_request(*requests[2])
    dit_engine.add_request(*requests[3])
    outputs.update(run_all(dit_engine))
    for rid, _, _ in requests:
        assert outputs[rid].error is None
        assert np.abs(outputs[rid].images - alone[rid]).max() < 1e-3, rid


def test_outputs_types_and_latents(dit_engine):
    dit_engine.add_request("pil", "a red sunset", Params(height=32, width=32, num_inference_steps=2, seed=5,
                                                          return_latents=True))  # fmt: skip
    dit_engine.add_request("lat", "a red sunset", Params(height=32, width=32, num_inference_steps=2, seed=5,
                                                          output_type="latent"))  # fmt: skip
    outputs = run_all(dit_engine)
    pil, lat = outputs["pil"], outputs["lat"]
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (32, 32)
    assert lat.images is None and lat.latents is not None
    assert torch.equal(pil.latents, lat.latents)
    assert pil.latents.device.type == "cpu" and pil.seed == 5


def test_seed_defaults_to_random_but_is_reported(dit_engine):
    params = Params(height=32, width=32, num_inference_steps=2, output_type="np")
    dit_engine.add_request("s1", "a red sunset", params)
    first = run_all(dit_engine)["s1"]
    dit_engine.add_request("s2", "a red sunset", Params(**{**params.__dict__, "seed": first.seed}))
    assert np.array_equal(run_all(dit_engine)["s2"].images, first.images)


def test_step_cache_skips_steps_per_request_and_stays_close(dit_path):
    """First-block cache: some rows skip the other blocks, images stay close (PSNR), memory is released."""
    from vllm_omni.config.dit import DiTConfig
    from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

    images = {}
    for step_cache in (None, "first_block"):
        engine = DiffusionEngine(
            dit_path, DiTConfig(cache={"step_cache": step_cache, "step_cache_threshold": 0.2})
        )
        for i in range(2):
            params = Params(height=32, width=32, num_inference_steps=12 + 4 * i, guidance_scale=3.0, seed=i,
                            output_type="np")  # fmt: skip
            engine.add_request(str(i), PROMPTS[i], params)
        images[step_cache] = {k: o.images for k, o in run_all(engine).items()}
    cache = engine.runner.step_cache
    assert cache.skipped > 0 and cache.computed > 0
    assert engine.memory_stats()["running_bytes"] == 0
    for key, reference in images[None].items():
        mse = float(np.mean((images["first_block"][key] - reference) ** 2))
        assert 0 < mse and 10 * np.log10(1 / mse) > 30  # close to the uncached image, not identical


def test_partial_images_are_previews_at_even_steps_and_leave_the_image_alone(dit_engine):
    size = dict(height=32, width=32, num_inference_steps=6, seed=3, output_type="np")
    dit_engine.add_request("plain", "a red sunset", Params(**size))
    plain = run_all(dit_engine)["plain"]
    dit_engine.add_request("previewed", "a red sunset", Params(**size, partial_images=2))
    outputs = []
    while dit_engine.has_unfinished_requests():
        outputs += dit_engine.step()
    previews, (final,) = outputs[:-1], outputs[-1:]
    assert [(o.partial_image_index, o.num_steps) for o in previews] == [(0, 2), (1, 4)]
    assert final.partial_image_index is None and np.array_equal(final.images, plain.images)
    assert all(
        o.images.shape == plain.images.shape and not np.array_equal(o.images, plain.images) for o in previews
    )
    assert dit_engine.memory_stats()["states"] == 0
    with pytest.raises(ValueError, match=r"partial_images 2 must be fewer than the steps \(2\)"):
        dit_engine.add_request("x", "a", Params(**{**size, "num_inference_steps": 2, "partial_images": 2}))
    with pytest.raises(ValueError, match=r"partial_images must be an integer in \[0, 3\], got 4"):
        Params(partial_images=4)
