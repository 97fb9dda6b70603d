"""Stages by hub repo id, offline from an HF_HOME laid out as huggingface_hub lays it out: an ar stage and a
dit stage through a YAML file and OmniLLM, ``vllm serve ID --omni`` of each, and the errors naming the id."""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from tests.diffusion.conftest import run_all
from tests.utils import running_server
from vllm_omni.config.stage import create_ar_stage_config, create_dit_stage_config, load_stage_configs
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.entrypoints.cli.serve import OmniServeCommand, stages_from_args
from vllm_omni.entrypoints.omni_llm import OmniLLM
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.testing.hf_cache import add_to_hf_cache, use_offline_hf_home
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

AR_ID, DIT_ID = "tiny-org/qwen3", "tiny-org/sd2"
PIPELINE = f"""
stages:
  - stage_id: 0
    engine_type: ar
    model_path: {AR_ID}
    engine_args: {{max_model_len: 512, enforce_eager: true, dtype: float32}}
  - stage_id: 1
    engine_type: dit
    model_path: {DIT_ID}
    dit_config: {{revision: v1, num_inference_steps: 2, height: 32, width: 32}}
"""


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An offline HF_HOME with the tiny qwen3 as tiny-org/qwen3 and the tiny sd2 as tiny-org/sd2 (tag v1)."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cache = use_offline_hf_home(monkeypatch, home)
        add_to_hf_cache(cache, AR_ID, tiny_model_path("qwen3"))
        add_to_hf_cache(cache, DIT_ID, tiny_model_path("sd2"), revision="v1")
        yield home


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    OmniServeCommand.subparser_init(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.mark.engine
def test_an_ar_and_a_dit_stage_by_id_from_yaml_through_omni_llm(hf_home, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    ar, dit = load_stage_configs(path)
    assert ar == create_ar_stage_config(0, AR_ID, max_model_len=512, enforce_eager=True, dtype="float32")
    dit_options = dict(revision="v1", num_inference_steps=2, height=32, width=32)
    assert dit == create_dit_stage_config(1, DIT_ID, **dit_options)
    omni = OmniLLM(path)
    try:
        greedy = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
        (out,) = omni.generate("A red fox", [greedy, {"seed": 1, "output_type": "np"}], use_tqdm=False)
        stats = omni.stage_stats(1)
    finally:
        omni.close()
    assert out.error is None and out.text and stats["executor"] == "diffusers"
    local = create_diffusion_engine(tiny_model_path("sd2"), dit.dit_config)  # the same stage on the folder
    local.add_request("r", out.text, DiffusionSamplingParams(seed=1, output_type="np"))
    assert np.abs(out.images - run_all(local)["r"].images).max() <= 1 / 255


def test_a_missing_id_fails_the_stage_start_naming_it(hf_home):
    with pytest.raises(OmniStageError) as error:
        OmniLLM([create_dit_stage_config(0, "tiny-org/none")])
    assert "stage 0 (dit) failed to start" in str(error.value)
    assert "'tiny-org/none' (revision 'main') is not in the Hugging Face cache" in str(error.value)


def test_serve_tells_a_diffusers_id_from_a_vllm_id(hf_home):
    args = serve_args(DIT_ID, "--omni", "--revision", "v1", "--dit-steps", "2", "--dit-compile", "on")
    (dit,) = stages_from_args(args)
    assert (dit.engine_type, dit.model_path) == ("dit", DIT_ID)
    assert (dit.dit_config.revision, dit.dit_config.num_inference_steps, dit.dit_config.compile) == (
        "v1",
        2,
        "on",
    )
    (ar,) = stages_from_args(serve_args(AR_ID, "--omni", "--revision", "main"))
    assert (ar.engine_type, ar.model_path, ar.engine_args["revision"]) == ("ar", AR_ID, "main")
    missing = r"^'tiny-org/sd2' \(revision 'v2'\) is not in the Hugging Face cache"
    with pytest.raises(ValueError, match=missing):
        stages_from_args(serve_args(DIT_ID, "--omni", "--revision", "v2"))


def test_vllm_serve_a_diffusers_id(hf_home):
    flags = ("--omni", "--revision", "v1", "--dit-steps", "2", "--dit-size", "32x32")
    with running_server(DIT_ID, *flags) as url:
        (stage,) = requests.get(f"{url}/info", timeout=30).json()["stages"]
        body = {"prompt": "A red fox", "response_format": "b64_json"}
        response = requests.post(f"{url}/v1/images/generations", json=body, timeout=120)
    assert (stage["model"], stage["kind"], stage["executor"]) == (DIT_ID, "dit", "diffusers")
    (image,) = response.json()["data"]
    assert Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))).size == (32, 32)


@pytest.mark.engine
def test_vllm_serve_a_vllm_model_id(hf_home):
    with running_server(AR_ID, "--omni", "--dtype", "float32") as url:
        (stage,) = requests.get(f"{url}/info", timeout=30).json()["stages"]
        body = {"model": AR_ID, "prompt": "A red fox", "max_tokens": 4, "ignore_eos": True}
        response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert (stage["model"], stage["kind"]) == (AR_ID, "ar")
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
