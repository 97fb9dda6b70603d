"""Tiny DiT checkpoints (sd3, z_image): deterministic diffusers folders that real pipelines run on CPU."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
)
from PIL import Image
from safetensors.torch import load_file

from vllm_omni.testing import tiny_dit, tiny_models

SD3_CFG = dict(guidance_scale=5.0, negative_prompt="dull")
FAMILIES = {  # name: text-to-image class, image-to-image class, call kwargs (with CFG)
    "sd3": (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, SD3_CFG),
    "z_image": (ZImagePipeline, ZImageImg2ImgPipeline, dict(guidance_scale=2.0)),
}
PROMPT = "A red fox in the park"


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def generate(pipe, name: str, size: int, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {**FAMILIES[name][2], **kwargs}
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=2,
        generator=generator,
        output_type="np",
        **kwargs,
    )
    return out.images[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    pipe = DiffusionPipeline.from_pretrained(tiny_models.tiny_model_path(name))
    pipe.set_progress_bar_config(disable=True)
    return name, pipe


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builds_are_deterministic(tmp_path, name):
    # The cached folder was built by an earlier build (maybe another process): a new build matches it.
    cached = Path(tiny_models.tiny_model_path(name))
    tiny_models.TINY_MODELS[name](tmp_path)
    assert digest(tmp_path) == digest(cached)
    assert "model_index.json" in digest(tmp_path)


def test_loads_as_its_pipelines_in_float32(family):
    name, pipe = family
    t2i, i2i, _ = FAMILIES[name]
    assert type(pipe) is t2i
    assert type(i2i.from_pretrained(tiny_models.tiny_model_path(name))) is i2i
    assert pipe.vae_scale_factor == tiny_dit.VAE_SCALE_FACTOR
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert {p.dtype for p in component.parameters()} == {torch.float32}


@pytest.mark.parametrize("size", [32, 64])
def test_text_to_image_with_guidance(family, size):
    name, pipe = family
    image = generate(pipe, name, size)
    assert image.shape == (size, size, 3)
    assert image.std() > 0.05  # random weights, but not a constant image
    np.testing.assert_array_equal(image, generate(pipe, name, size))  # same seed, same image
    assert not np.array_equal(image, generate(pipe, name, size, seed=1))


def test_image_to_image(family):
    name, pipe = family
    img2img = FAMILIES[name][1].from_pipe(pipe)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image = generate(img2img, name, 64, image=init, strength=0.6)
    assert image.shape == (64, 64, 3) and image.std() > 0.05


def test_sizes_must_be_multiples_of_vae_scale_times_patch(family):
    name, pipe = family
    assert tiny_dit.SIZE_MULTIPLE == 4
    generate(pipe, name, 36)
    with pytest.raises(ValueError, match="divisible by 4"):
        generate(pipe, name, 34)


def test_z_image_text_encoder_is_the_tiny_qwen3_lm(qwen3_path):
    z_image = Path(tiny_models.tiny_model_path("z_image"))
    lm = load_file(Path(qwen3_path) / "model.safetensors")
    encoder = load_file(z_image / "text_encoder" / "model.safetensors")
    expected = {k.removeprefix("model."): v for k, v in lm.items() if k.startswith("model.")}
    assert encoder.keys() == expected.keys() and "lm_head.weight" in lm
    for key, weight in expected.items():
        torch.testing.assert_close(encoder[key], weight, rtol=0, atol=0)
    for file in ("tokenizer.json", "chat_template.jinja"):
        assert (z_image / "tokenizer" / file).read_bytes() == (Path(qwen3_path) / file).read_bytes()


def _other_qwen3_builder(out: Path) -> None:
    tiny_models.build_qwen3(out)


def test_z_image_is_rebuilt_when_qwen3_changes(monkeypatch):
    before = tiny_models.fingerprint("z_image")
    # A builder defined elsewhere (here: this test module) is a different definition.
    monkeypatch.setitem(tiny_models.TINY_MODELS, "qwen3", _other_qwen3_builder)
    assert tiny_models.fingerprint("z_image") != before
