"""`POST /v1/images/edits` on `vllm serve MODEL --omni` with the tiny SD3: the official openai client against
the DiT engine run directly, streamed edits, inpainting (OpenAI's alpha masks), the size taken from the
image, the example client, bad input."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from tests.utils import random_image, running_server
from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.stage import create_ar_stage_config, create_dit_stage_config
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.entrypoints.openai.image_edits import ImageRequestError, _check_pipeline, refuses_image
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

INIT = random_image(0)


def alpha_mask(size: tuple[int, int] = (32, 32), box: tuple[int, ...] = (8, 4, 30, 21)) -> Image.Image:
    """OpenAI's kind of mask: an RGBA image, fully transparent (alpha 0) inside ``box``, where to edit."""
    mask = Image.new("RGBA", size, (10, 20, 30, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


@pytest.fixture(scope="module")
def url():
    with running_server(tiny_model_path("sd3"), "--omni", "--dit-steps", "2", "--dit-size", "32x32") as url:
        yield url


@pytest.fixture(scope="module")
def engine():
    """The server's dit stage run directly."""
    return DiffusionEngine(tiny_model_path("sd3"), DiTConfig(num_inference_steps=2, height=32, width=32))


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_edit_equals_the_dit_engine_with_the_same_image_seed_and_strength(client, engine):
    extra = {"seed": 3, "strength": 0.5}
    response = client.images.edit(image=("init.png", png(INIT), "image/png"), prompt="a red sunset", n=2,
                                  extra_body=extra)  # fmt: skip
    assert len(response.data) == 2 and response.size == "32x32"
    for i in range(2):
        prompt = {"prompt": "a red sunset", "image": INIT}
        engine.add_request(str(i), prompt, DiffusionSamplingParams(seed=3 + i, strength=0.5))
    engine.add_request("text", "a red sunset", DiffusionSamplingParams(seed=3))
    expected = {}
    while engine.has_unfinished_requests():
        expected.update({o.request_id: o for o in engine.step()})
    assert expected["0"].num_steps == 1  # strength 0.5 of 2 steps
    images = [np.asarray(decode(item.b64_json), dtype=int) for item in response.data]
    for i, image in enumerate(images):
        assert image.shape == (32, 32, 3)
        assert np.abs(image - np.asarray(expected[str(i)].images[0], dtype=int)).max() <= 1
    assert np.abs(images[0] - np.asarray(expected["text"].images[0], dtype=int)).max() > 1  # the image counts


def test_a_masked_edit_equals_the_dit_engine_with_the_mask_in_diffusers_convention(client, engine):
    """The transparent area of OpenAI's mask is repainted: the stage gets it white (diffusers' convention),
    the rest black; partial transparency keeps, as only alpha 0 marks an edit."""
    mask = alpha_mask()
    mask.paste((0, 0, 0, 128), (0, 0, 4, 4))
    image, mask = ("init.png", png(INIT), "image/png"), ("mask.png", png(mask), "image/png")
    response = client.images.edit(image=image, mask=mask, prompt="a red sunset", extra_body={"seed": 3})
    white = Image.new("L", (32, 32))
    white.paste(255, (8, 4, 30, 21))
    masked, unmasked = ({"prompt": "a red sunset", "image": INIT, "mask_image": white},
                        {"prompt": "a red sunset", "image": INIT})  # fmt: skip
    engine.add_request("masked", masked, DiffusionSamplingParams(seed=3))
    engine.add_request("unmasked", unmasked, DiffusionSamplingParams(seed=3))
    expected = {}
    while engine.has_unfinished_requests():
        expected.update({o.request_id: o for o in engine.step()})
    image = np.asarray(decode(response.data[0].b64_json), dtype=int)
    assert np.abs(image - np.asarray(expected["masked"].images[0], dtype=int)).max() <= 1
    assert np.abs(image - np.asarray(expected["unmasked"].images[0], dtype=int)).max() > 1  # the mask counts


def test_a_streamed_edit_sends_previews_then_the_image_of_the_same_edit_unstreamed(client):
    file = ("init.png", png(INIT), "image/png")
    extra = {"seed": 5, "strength": 0.5, "num_inference_steps": 6}  # 3 steps run: previews after 1 and 2
    stream = client.images.edit(
        image=file, prompt="a red sunset", stream=True, partial_images=2, extra_body=extra
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(decode(e.b64_json).size == (32, 32) and e.size == "32x32" for e in events)
    whole = client.images.edit(image=file, prompt="a red sunset", extra_body=extra).data[0].b64_json
    assert events[2].b64_json == whole and events[2].usage is not None  # previews leave the image alone
    assert whole not in (events[0].b64_json, events[1].b64_json)


def test_size_auto_is_the_image_size_rounded_to_the_dit_and_any_mode_is_taken(client):
    grey = random_image(1, width=50, height=42).convert("L")  # SD3 takes multiples of 4
    response = client.images.edit(image=("grey.png", png(grey), "image/png"), prompt="a cat",
                                  output_format="jpeg", extra_body={"strength": 1.0})  # fmt: skip
    image = decode(response.data[0].b64_json)
    assert response.size == "48x40" and image.size == (48, 40) and image.format == "JPEG"
    sized = client.images.edit(image=("grey.png", png(grey), "image/png"), prompt="a cat", size="32x32")
    assert decode(sized.data[0].b64_json).size == (32, 32)


def test_the_openai_clients_image_list_of_one_is_taken_of_two_refused(client):
    file = ("init.png", png(INIT), "image/png")
    assert client.images.edit(image=[file], prompt="a cat").data  # sent as image[]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=[file, file], prompt="a cat")
    assert refused.value.body["param"] == "image" and "edits one image" in refused.value.body["message"]


@pytest.mark.parametrize("option", [None, "--stream", "--mask"])
def test_the_image_edit_client_example(url, tmp_path, option):
    example = Path(__file__).parents[2] / "examples" / "online_serving" / "omni_image_edit_client.py"
    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "edited.png"
    INIT.save(init)
    alpha_mask().save(mask)
    options = {None: [], "--stream": ["--stream"], "--mask": ["--mask", str(mask)]}[option]
    command = [sys.executable, str(example), "--url", url, "--image", str(init), "--out", str(out), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (32, 32) and "(32x32)" in result.stdout
    previews = [path.name for path in tmp_path.glob("edited.partial*.png")]
    assert previews == (["edited.partial0.png"] if option == "--stream" else [])


def _image(data: bytes = b"", name: str = "image"):
    return [(name, ("init.png", data or png(INIT), "image/png"))]


def _mask(data: bytes, name: str = "mask"):
    return [(name, ("mask.png", data, "image/png"))]


BAD_REQUESTS = [
    (_image() + _mask(png(INIT)), {"prompt": "x"}, "mask"),  # no alpha channel: nothing marks the edit
    (_image() + _mask(b"not an image"), {"prompt": "x"}, "mask"),
    (_image() + _mask(png(alpha_mask((16, 16), (0, 0, 8, 8)))), {"prompt": "x"}, "mask"),  # other size
    (_image() + _mask(png(alpha_mask())) * 2, {"prompt": "x"}, "mask"),
    ([], {"prompt": "x", "mask": "not a file"}, "image"),  # the image is checked first
    (_image() + [("mask", (None, "not a file"))], {"prompt": "x"}, "mask"),
    (_image(b"just some text, not an image"), {"prompt": "x"}, "image"),
    (_image(png(INIT)[:100]), {"prompt": "x"}, "image"),  # a truncated PNG
    ([], {"prompt": "x"}, "image"),
    (_image() + _image(), {"prompt": "x"}, "image"),
    (_image(name="image[]") + _image(name="image[]"), {"prompt": "x"}, "image"),  # the openai client's list
    ([], {"prompt": "x", "image": "not a file"}, "image"),
    (_image(), {}, "prompt"),
    (_image(), {"prompt": "x", "strength": 0}, "strength"),
    (_image(), {"prompt": "x", "strength": 1.5}, "strength"),
    (_image(), {"prompt": "x", "size": "30x32"}, "size"),
    (_image(), {"prompt": "x", "size": "big"}, "size"),
    (_image(png(random_image(2, 256, 256))), {"prompt": "x"}, "size"),  # auto: more than the tiny SD3 takes
    (_image(), {"prompt": "x", "response_format": "url"}, "response_format"),
    (_image(), {"prompt": "x", "n": 11}, "n"),
    (_image(), {"prompt": "x", "stream": "maybe"}, "stream"),
    (_image(), {"prompt": "x", "stream": "true", "n": 2}, "n"),  # the events carry no image index
    (_image(), {"prompt": "x", "stream": "true", "partial_images": 4}, "partial_images"),
    (_image(), {"prompt": "x", "partial_images": 1}, "partial_images"),  # previews are streamed
    (_image(), {"prompt": "x", "style": "vivid"}, "style"),
]


@pytest.mark.parametrize(("files", "fields", "param"), BAD_REQUESTS)
def test_bad_edits_are_400_naming_the_field_and_the_server_goes_on(url, files, fields, param):
    form = files + [(name, (None, str(value))) for name, value in fields.items()]
    response = requests.post(f"{url}/v1/images/edits", files=form, timeout=60)
    _assert_refused(response, param)
    _assert_a_good_edit(url)


def test_a_field_given_twice_a_malformed_or_json_body_is_400(url):
    twice = _image() + [("prompt", (None, "x")), ("n", (None, "1")), ("n", (None, "2"))]
    _assert_refused(requests.post(f"{url}/v1/images/edits", files=twice, timeout=60), "n")
    no_name = b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n"
    for content_type in ("multipart/form-data; boundary=b", "multipart/form-data"):  # the second: no boundary
        headers = {"content-type": content_type}
        response = requests.post(f"{url}/v1/images/edits", data=no_name, headers=headers, timeout=60)
        _assert_refused(response, None)
        assert "malformed multipart/form-data" in response.json()["error"]["message"]
    _assert_refused(requests.post(f"{url}/v1/images/edits", json={"prompt": "x"}, timeout=60), None)
    _assert_a_good_edit(url)


def _assert_refused(response: requests.Response, param: str | None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", 400), error


def _assert_a_good_edit(url: str) -> None:
    good = requests.post(f"{url}/v1/images/edits", files=_image() + [("prompt", (None, "fine"))], timeout=60)
    assert good.status_code == 200 and decode(good.json()["data"][0]["b64_json"]).size == (32, 32)


def test_the_image_goes_to_a_first_dit_stage_only():
    ar, dit = create_ar_stage_config(0, "qwen3"), create_dit_stage_config(1, "sd3", source_stage=0)
    with pytest.raises(ImageRequestError, match="first stage is its dit stage") as refused:
        _check_pipeline([ar, dit])
    assert refused.value.param == "image"
    _check_pipeline([create_dit_stage_config(0, "sd3")])


def test_a_mask_on_a_pipeline_without_inpainting_is_400_naming_it():
    """PixArt (diffusers executor): diffusers has no inpainting pipeline for it; /info says so."""
    with running_server(tiny_model_path("pixart_sigma"), "--omni", "--dit-steps", "2") as url:
        assert requests.get(f"{url}/info", timeout=30).json()["stages"][0]["limits"]["inpainting"] is False
        form = _image() + _mask(png(alpha_mask())) + [("prompt", (None, "x"))]
        response = requests.post(f"{url}/v1/images/edits", files=form, timeout=60)
    _assert_refused(response, "mask")
    assert response.json()["error"]["message"] == (
        "stage 0 (dit): mask: PixArtSigmaPipeline does not inpaint (diffusers has no inpainting pipeline for "
        "it); send no mask"
    )


def test_a_dit_stage_refusing_the_image_is_named():
    assert refuses_image("stage 0 (dit): ValueError: image: SanaPipeline has no image-to-image pipeline")
    assert not refuses_image("stage 0 (dit): ValueError: height must be a multiple of 8 for sd3, got 30")
