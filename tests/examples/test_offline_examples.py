"""Every offline example runs as a user runs it (its own process, tiny checkpoints) and prints what it
promises. The projector training example has its own test (test_train_projectors.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

EXAMPLES = Path(__file__).parents[2] / "examples" / "offline_inference"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_basic_generate_shows_the_patch_layer_in_every_process_and_an_embedding():
    out = run_example("basic_generate.py")
    for process in ("MainProcess", "EngineCore", "VllmWorker-0"):
        assert f"patch layer in {process} " in out
    assert "[qwen3] 'Hello, world! Tell me a story.' -> " in out
    assert "[llava] mm_embedding: (16, 64) torch.bfloat16 on cpu" in out


def test_mm_embedding_example_prints_each_item_and_the_pooled_rows():
    out = run_example("mm_embedding_example.py")
    assert "item 0 (image): (16, 64)" in out and "item 1 (image): (16, 64)" in out
    assert "pooled: (2, 64) torch.float16" in out


def test_multimodal_qwen3_example_runs_vllm_and_the_pipeline():
    out = run_example("multimodal_qwen3_example.py")
    assert "prompt positions: 1 + 3 audio rows" in out and "vLLM: " in out and "pipeline: " in out


def test_text_to_image_example_writes_a_png_per_prompt(tmp_path):
    out = run_example("omni_text_to_image.py", "--out", str(tmp_path), "--steps", "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"omni_text_to_image_{i}.png" for i in (0, 1)]
    assert out.count("stage 0 wrote the prompt: ") == 2


def test_hidden_state_example_draws_what_the_dits_own_encoder_draws(tmp_path):
    out = run_example("omni_hidden_state_pipeline.py", "--out", str(tmp_path), "--steps", "2")
    assert out.count("max pixel difference vs the DiT's own encoder: 0") == 2
    assert len(list(tmp_path.glob("omni_hidden_state_*.png"))) == 2


def test_yaml_pipeline_example_runs_the_example_yaml(tmp_path):
    out = run_example("omni_yaml_pipeline.py", "--out", str(tmp_path))
    assert "stage 1 drew" in out and (tmp_path / "omni_yaml_0.png").exists()


def test_qwen2_5_omni_example_writes_a_wav_per_question(tmp_path):
    out = run_example("qwen2_5_omni_speech.py", "--out", str(tmp_path), "--max-tokens", "4", "--voice=Ethan")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"qwen2_5_omni_{i}.wav" for i in (0, 1)]
    assert out.count("  text: ") == 2 and out.count("(Ethan)") == 2
