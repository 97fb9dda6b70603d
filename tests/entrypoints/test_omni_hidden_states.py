"""Hidden-state hand-off: a vLLM stage encodes the prompt for a Z-Image stage (its text encoder is an LM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.diffusion.conftest import run_all
from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

pytestmark = pytest.mark.engine

DIT = dict(num_inference_steps=3, height=32, width=32)
PROMPTS = ["A beautiful landscape", "A red sunset over the sea, painted in oils", ""]
# Guidance off, and on (the negative prompt "" is then encoded by the DiT stage's own encoder).
DIT_PARAMS = [{"seed": i, "output_type": "np", "guidance_scale": g} for i, g in enumerate((0.0, 2.0, 2.0))]


@pytest.fixture(scope="module")
def outputs():
    encoder = create_ar_stage_config(0, tiny_model_path("qwen3"), ["text"], ["hidden_states"],
                                     final_output=False, stage_input="chat_template",
                                     prompt_hidden_states_layer=-2, dtype="float32", max_model_len=1024,
                                     enforce_eager=True)  # fmt: skip
    dit = create_dit_stage_config(1, tiny_model_path("z_image"), ["hidden_states"], ["image"], **DIT)
    omni = OmniLLM([encoder, dit], keep_stage_outputs=True)  # the handed-on hidden states are compared
    try:
        yield omni.generate(PROMPTS, [{"max_tokens": 1}, DIT_PARAMS], use_tqdm=False)
    finally:
        omni.close()


@pytest.fixture(scope="module")
def in_process():
    """The same DiT with the same LM as its own text encoder, on the text."""
    return DiffusionEngine(tiny_model_path("z_image"), DiTConfig(**DIT))


def test_the_ar_stage_returns_the_dits_own_text_conditioning(outputs, in_process):
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        embeds = out.stage_outputs[0].outputs[0].prompt_hidden_states
        expected = in_process.runner.family.encode([prompt])[0]
        assert embeds.device.type == "cpu" and embeds.dtype == torch.float32
        assert embeds.shape == expected.shape  # the chat-templated prompt's tokens x hidden size
        torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)


def test_the_image_equals_the_dit_running_the_lm_in_process(outputs, in_process):
    for i, (prompt, params) in enumerate(zip(PROMPTS, DIT_PARAMS, strict=True)):
        in_process.add_request(str(i), prompt, DiffusionSamplingParams(**params))
    expected = run_all(in_process)
    for i, out in enumerate(outputs):
        assert out.error is None and out.text is None
        assert out.images.shape == expected[str(i)].images.shape == (1, 32, 32, 3)
        assert np.abs(out.images - expected[str(i)].images).max() < 1e-5, PROMPTS[i]
