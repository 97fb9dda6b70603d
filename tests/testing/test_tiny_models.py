"""Tiny checkpoints: deterministic, cached by definition, buildable from the CLI, loadable by vLLM."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from tests.utils import running_llm
from vllm_omni.testing import tiny_models


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["qwen3", "llava", "multimodal_qwen3"])
def test_builds_are_deterministic(tmp_path, name):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        out.mkdir()
        tiny_models.TINY_MODELS[name](out)
    assert digest(first) == digest(second)
    assert "model.safetensors" in digest(first)


def _other_qwen3_builder(out: Path) -> None:
    tiny_models.build_qwen3(out)


def test_cache_reuses_and_rebuilds_on_definition_change(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny_models.CACHE_ENV, str(tmp_path))
    path = Path(tiny_models.tiny_model_path("qwen3"))
    assert path.parent == tmp_path
    built_at = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(tiny_models.tiny_model_path("qwen3")) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at

    # A builder defined elsewhere (here: this test module) is a different definition.
    monkeypatch.setitem(tiny_models.TINY_MODELS, "qwen3", _other_qwen3_builder)
    rebuilt = Path(tiny_models.tiny_model_path("qwen3"))
    assert rebuilt != path and (rebuilt / "config.json").exists()


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny model 'nope'; available: qwen3, llava"):
        tiny_models.tiny_model_path("nope")


def test_cli_writes_named_checkpoints(tmp_path):
    cmd = [sys.executable, "-m", "vllm_omni.testing.tiny_models", "--out", str(tmp_path), "qwen3"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert (tmp_path / "qwen3" / "config.json").exists()
    assert (tmp_path / "qwen3" / "tokenizer.json").exists()
    assert not (tmp_path / "llava").exists()

    bad = subprocess.run([*cmd[:-1], "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown tiny model(s) nope" in bad.stderr


@pytest.mark.engine
@pytest.mark.parametrize("name", ["qwen3", "llava", "multimodal_qwen3"])
def test_loads_in_vllm_in_bfloat16(name):
    with running_llm(tiny_models.tiny_model_path(name), dtype="bfloat16") as llm:
        assert llm.llm_engine.model_config.dtype.__repr__() == "torch.bfloat16"
        # Not a 2-token prompt: stock vLLM 0.32 in bfloat16 dies on one (SIGILL) on AMX CPUs (ENVIRONMENT.md).
        output = llm.generate("Hello, my name is Ada and I", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(output.outputs[0].token_ids) == 4
