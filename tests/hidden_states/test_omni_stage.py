"""Per-layer hidden states of every position from an ``OmniLLM`` ar stage: the dict crosses from the
stage process with the stage's ``RequestOutput`` (``stage_io``), values as the engine computed them."""

import pytest
import torch

from tests.hidden_states.conftest import PROMPTS
from tests.hidden_states.test_all_positions import LAYERS, assert_rows_match_hf, fed_tokens
from vllm_omni import OmniLLM, create_ar_stage_config

pytestmark = pytest.mark.engine


def test_an_ar_stage_returns_every_position_of_each_layer(qwen3_path, hf_qwen3):
    stage = create_ar_stage_config(
        0, qwen3_path, ["text"], ["text"], dtype="float32", max_model_len=256, enforce_eager=True,
        return_prompt_hidden_states=True, prompt_hidden_states_layer=LAYERS,
    )  # fmt: skip
    params = {
        "temperature": 0.0,
        "max_tokens": 5,
        "ignore_eos": True,
        "extra_args": {"prompt_hidden_states": "all"},
    }
    omni = OmniLLM([stage], keep_stage_outputs=True)
    try:
        outputs = omni.generate(list(PROMPTS[1:3]), params, use_tqdm=False)
    finally:
        omni.close()
    for out in outputs:
        stage_output = out.stage_outputs[0]
        rows = stage_output.outputs[0].hidden_states
        assert rows[0].shape == (len(stage_output.prompt_token_ids) + 5 - 1, 64)
        assert all(tensor.dtype == torch.float32 for tensor in rows.values())
        assert_rows_match_hf(hf_qwen3, stage_output, fed_tokens(stage_output))
