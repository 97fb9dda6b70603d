"""Inpainting (an init image with a mask) on the native engine, against diffusers' inpaint pipelines on the
same tiny folders (CPU, float32), per request inside mixed batches, and its checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForInpainting
from PIL import Image

from tests.diffusion.conftest import GUIDANCE, run_all
from tests.diffusion.test_dit_engine import init_image
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params

CASES = [("a cat on a sofa", "blurry", 5, 4, 0.75), ("a red sunset", None, 6, 3, 1.0)]
"""(prompt, negative prompt, seed, steps, strength): strength 1 starts from pure noise."""


def edit_mask(size: int = 32, box: tuple[int, int, int, int] = (8, 4, 30, 21)) -> Image.Image:
    """White (repaint) inside ``box`` (left, top, right, bottom; not on the latent grid), black elsewhere."""
    mask = Image.new("L", (size, size))
    mask.paste(255, box)
    return mask


@torch.no_grad()
def decoded(pipe, latents: torch.Tensor) -> np.ndarray:
    """The image of final latents as diffusers' SD3 and Z-Image pipelines decode them.

    ``StableDiffusion3InpaintPipeline`` itself decodes without the VAE's ``shift_factor`` (diffusers issue
    13611, finding 1), unlike every other SD3 pipeline and its own encoder; the engine decodes as they do.
    """
    vae = pipe.vae
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")[0]


@pytest.fixture(scope="module")
def inpaint_pipe(diffusers_pipes):
    """Diffusers' inpaint pipeline of the family (SD3, Z-Image) on the reference pipeline's components."""
    pipe = AutoPipelineForInpainting.from_pipe(diffusers_pipes[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_matches_the_diffusers_inpaint_pipeline(dit_family, dit_engine, inpaint_pipe):
    """Same folder, image, mask, prompt, seed, steps, strength and guidance: the final latents and the image
    equal diffusers' (both requests run batched in the engine)."""
    guidance, image, mask = GUIDANCE[dit_family], init_image(), edit_mask()
    for i, (prompt, negative, seed, steps, strength) in enumerate(CASES):
        dit_engine.add_request(
            f"inpaint-{i}",
            {"prompt": prompt, "negative_prompt": negative, "image": image, "mask_image": mask},
            Params(num_inference_steps=steps, guidance_scale=guidance, seed=seed, strength=strength,
                   output_type="np", return_latents=True),
        )  # fmt: skip
    outputs = run_all(dit_engine)
    for i, (prompt, negative, seed, steps, strength) in enumerate(CASES):
        expected = inpaint_pipe(
            prompt=prompt, negative_prompt=negative, image=image, mask_image=mask, strength=strength,
            num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        ).images  # fmt: skip
        out = outputs[f"inpaint-{i}"]
        assert out.error is None and out.num_steps == steps - int(steps - steps * strength)
        latent_diff = (out.latents - expected).abs().max().item()
        pixel_diff = np.abs(out.images[0] - decoded(inpaint_pipe, expected)).max()
        print(f"{dit_family} inpainting, strength {strength}: max abs latent diff {latent_diff:.1e}, "
              f"pixel diff {pixel_diff:.1e}")  # fmt: skip
        assert latent_diff < 1e-4 and pixel_diff <= 1 / 255


def test_only_the_white_area_is_repainted(dit_engine):
    """The final latents keep the init image's latents exactly where the (latent-size) mask is black, and
    differ from them where it is white."""
    mask = edit_mask(box=(0, 0, 16, 32))  # the left half: latent columns 0-7 of 16 in both families
    prompt = {"prompt": "a cat", "image": init_image(), "mask_image": mask}
    dit_engine.add_request("half", prompt, Params(num_inference_steps=3, seed=1, output_type="latent"))
    latents = run_all(dit_engine)["half"].latents
    runner = dit_engine.runner
    request = runner.make_request("init", prompt, Params(num_inference_steps=3, seed=1))
    image_latents = runner.family._image_latents(request, torch.Generator().manual_seed(1)).cpu()
    width = latents.shape[-1]
    assert torch.equal(latents[..., width // 2 :], image_latents[..., width // 2 :])
    assert (latents[..., : width // 2] - image_latents[..., : width // 2]).abs().mean() > 0.1


def test_a_masked_request_is_the_same_alone_and_batched(dit_family, dit_engine):
    """Rows of a step batch do not affect each other: a masked request batched with a text-to-image and an
    image-to-image request (other seeds, steps, guidance) gives the image it gives alone; an RGBA mask is
    read as its grayscale, as diffusers reads it."""
    g = GUIDANCE[dit_family]
    masked = {"prompt": "a cat", "image": init_image(seed=2), "mask_image": edit_mask()}
    params = Params(num_inference_steps=4, guidance_scale=g, seed=3, strength=0.8, output_type="np")
    dit_engine.add_request("alone", masked, params)
    alone = run_all(dit_engine)["alone"].images
    dit_engine.add_request("t2i", "a dog", Params(height=32, width=32, num_inference_steps=5, seed=4))
    dit_engine.add_request("i2i", {"prompt": "a dog", "image": init_image(seed=3)},
                           Params(num_inference_steps=3, guidance_scale=0.0, seed=5))  # fmt: skip
    first_step = dit_engine.step()  # the masked request joins a batch already running
    dit_engine.add_request("batched", masked, params)
    dit_engine.add_request("rgba", {**masked, "mask_image": masked["mask_image"].convert("RGBA")}, params)
    outputs = {o.request_id: o for o in first_step} | run_all(dit_engine)
    assert all(o.error is None for o in outputs.values())
    for request_id in ("batched", "rgba"):
        assert np.abs(outputs[request_id].images - alone).max() < 1e-3, request_id


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"prompt": "x", "mask_image": edit_mask()}, r"mask_image masks the init image: pass the image"),
        ({"prompt": "x", "image": init_image(), "mask_image": edit_mask(16)},
         r"mask_image is 16x16 \(WxH\), the init image 32x32: the mask must have the image's size"),
        ({"prompt": "x", "image": init_image(), "mask_image": np.zeros((32, 32, 1))},
         r"mask_image must be a PIL image .* got an array of shape \(32, 32, 1\)"),
        ({"prompt": "x", "image": init_image(), "mask_image": "mask.png"},
         r"mask_image must be a PIL image .* got str"),
    ],
)  # fmt: skip
def test_bad_masks_are_refused_when_added(dit_engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        dit_engine.add_request("bad", prompt, Params(num_inference_steps=2))
    assert not dit_engine.has_unfinished_requests()


def test_an_array_mask_equals_the_image_mask(dit_engine):
    """An (H, W) array or tensor in [0, 1] is the same mask as the PIL image it came from (three requests of
    one batch)."""
    mask = edit_mask()
    array = np.asarray(mask, dtype=np.float32) / 255
    for name, value in (("pil", mask), ("array", array), ("tensor", torch.from_numpy(array))):
        prompt = {"prompt": "a cat", "image": init_image(), "mask_image": value}
        dit_engine.add_request(name, prompt, Params(num_inference_steps=2, seed=9, output_type="latent"))
    latents = {request_id: o.latents for request_id, o in run_all(dit_engine).items()}
    for other in ("array", "tensor"):  # batch rows: equal up to float rounding
        assert (latents[other] - latents["pil"]).abs().max() < 1e-5, other
