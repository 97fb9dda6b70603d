"""Hub repo ids resolved offline from a Hugging Face cache laid out as huggingface_hub lays it out (the tiny
checkpoints copied in), and the errors that name the id, the revision and what is missing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.diffusion.conftest import run_all
from vllm_omni.config.stage import create_dit_stage_config
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.testing.hf_cache import add_to_hf_cache, use_offline_hf_home
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.transformers_utils.model_resolution import (
    ModelNotFoundError,
    diffusers_folder,
    ensure_available,
    model_file,
)
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

SMALL = dict(height=32, width=32, num_inference_steps=2, seed=1, output_type="np")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline HF_HOME holding tiny-org/sd2 (main, tag v1), tiny-org/qwen3 and tiny-org/broken (sd2 without
    its vae); the cache folder and sd2's commit."""
    cache = use_offline_hf_home(monkeypatch, tmp_path)
    commit = add_to_hf_cache(cache, "tiny-org/sd2", tiny_model_path("sd2"))
    add_to_hf_cache(cache, "tiny-org/sd2", tiny_model_path("sd2"), revision="v1")
    add_to_hf_cache(cache, "tiny-org/qwen3", tiny_model_path("qwen3"))
    broken = shutil.copytree(tiny_model_path("sd2"), tmp_path / "b", ignore=shutil.ignore_patterns("vae"))
    add_to_hf_cache(cache, "tiny-org/broken", broken)
    return cache, commit


def test_a_hub_id_resolves_to_its_cached_snapshot_at_any_revision(hub):
    cache, commit = hub
    snapshot = cache / "models--tiny-org--sd2" / "snapshots" / commit
    for revision in (None, "main", "v1", commit):
        assert diffusers_folder("tiny-org/sd2", revision) == snapshot
    assert (
        model_file("tiny-org/qwen3", "config.json").read_bytes()
        == (Path(tiny_model_path("qwen3")) / "config.json").read_bytes()
    )
    assert model_file("tiny-org/qwen3", "model_index.json") is None
    ensure_available("tiny-org/qwen3")  # what an ar stage checks before vLLM loads it


def test_a_dit_stage_by_id_equals_the_same_stage_on_the_folder(hub):
    stage = create_dit_stage_config(0, "tiny-org/sd2", revision="v1", max_batch_size=1)
    by_id = create_diffusion_engine(stage.model_path, stage.dit_config)
    by_folder = create_diffusion_engine(tiny_model_path("sd2"), stage.dit_config)
    images = []
    for engine in (by_id, by_folder):
        engine.add_request("r", "A red fox in the park", Params(**SMALL))
        images.append(run_all(engine)["r"].images[0])
    assert by_id.executor == "diffusers" and images[0].std() > 0.02
    np.testing.assert_array_equal(images[0], images[1])


def error_cases(cache: Path, commit: str) -> list[tuple[str, str | None, str]]:
    offline = "and HF_HUB_OFFLINE=1 forbids downloading"
    return [
        ("tiny-org/none", None,
         f"'tiny-org/none' (revision 'main') is not in the Hugging Face cache {cache} (it holds no revision "
         f"of it) {offline}"),
        ("tiny-org/sd2", "v2",
         f"'tiny-org/sd2' (revision 'v2') is not in the Hugging Face cache {cache} (it holds revision(s) "
         f"['{commit}', 'main', 'v1'] of it) {offline}"),
        ("tiny-org/qwen3", None,
         "'tiny-org/qwen3' (revision 'main') is not a diffusers pipeline: it has no model_index.json in its "
         "cached snapshot (HF_HUB_OFFLINE=1) (a vLLM model has config.json and runs in an 'ar' stage)"),
        ("tiny-org/broken", None,
         "'tiny-org/broken' (revision 'main'): model_index.json lists component(s) ['vae'] that the pipeline "
         "needs and "),
        ("/no/such/folder", None, "'/no/such/folder' is neither a local folder nor a Hugging Face repo id"),
    ]  # fmt: skip


def test_errors_name_the_id_the_revision_and_what_is_missing(hub):
    for model, revision, message in error_cases(*hub):
        stage = create_dit_stage_config(0, model, revision=revision)  # config creation reads no files
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            create_diffusion_engine(stage.model_path, stage.dit_config)
    with pytest.raises(ModelNotFoundError, match=re.escape("'tiny-org/none' (revision 'main') is not in")):
        ensure_available("tiny-org/none")
