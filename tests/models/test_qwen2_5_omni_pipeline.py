"""Qwen2.5-Omni end to end from its folder: thinker -> talker -> code2wav (``qwen2_5_omni_stages``), float32
on the tiny checkpoint, against transformers' whole ``generate`` (greedy thinker and talker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from tests.models.test_qwen2_5_omni_tiny import CHATS, hf, path, prompts  # noqa: F401  (fixtures)
from vllm_omni import OmniLLM
from vllm_omni.pipeline.model_pipelines import stages_for_model
from vllm_omni.pipeline.qwen2_5_omni_stages import qwen2_5_omni_stages

pytestmark = pytest.mark.engine

VOICE, SEED = "Ethan", 3
THINKER_TOKENS, TALKER_TOKENS = 6, 24
THINKER = SamplingParams(temperature=0.0, max_tokens=THINKER_TOKENS, ignore_eos=True)
TALKER = {"temperature": 0.0, "max_tokens": TALKER_TOKENS}  # greedy, the talker's stops and penalty kept


@pytest.fixture(scope="module")
def omni(path):  # noqa: F811
    pipeline = OmniLLM(qwen2_5_omni_stages(path, dtype="float32", max_model_len=512, enforce_eager=True))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def reference(hf, prompts) -> tuple[list[int], np.ndarray]:  # noqa: F811
    """transformers' generate on the text chat: the thinker's new ids and the waveform."""
    model, processor = hf
    inputs = processor(text=prompts["text"], return_tensors="pt")
    torch.manual_seed(SEED)  # greedy thinker and talker draw nothing: token2wav's noise is the first draw
    with torch.no_grad():
        ids, audio = model.generate(
            **inputs, speaker=VOICE, thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
            talker_max_new_tokens=TALKER_TOKENS, talker_do_sample=False,
        )  # fmt: skip
    return ids[0, inputs.input_ids.shape[1] :].tolist(), audio.reshape(-1).numpy()


def test_the_folder_implies_thinker_talker_code2wav(path):  # noqa: F811
    thinker, talker, code2wav = stages_for_model(path)
    assert (thinker.engine_type, talker.engine_type, code2wav.engine_type) == ("ar", "ar", "code2wav")
    assert thinker.final_output and not talker.final_output and code2wav.final_output
    assert talker.stage_input == "qwen2_5_omni_talker" and talker.default_params["top_k"] == 40


def test_speech_equals_transformers_generate(omni, prompts, reference):  # noqa: F811
    ids, audio = reference
    (out,) = omni.generate(
        [{"prompt": prompts["text"], "voice": VOICE}], [THINKER, TALKER, {"seed": SEED}], use_tqdm=False
    )
    assert out.error is None and out.stage_id == 2
    assert list(out.stage_outputs[0].outputs[0].token_ids) == ids
    assert out.audio.dtype == np.float32 and out.audio.shape == audio.shape
    np.testing.assert_allclose(out.audio, audio, atol=1e-5)


def test_a_text_only_request_skips_the_talker_and_code2wav(omni, prompts, reference):  # noqa: F811
    (out,) = omni.generate([prompts["text"]], THINKER, use_tqdm=False, modalities=["text"])
    assert out.error is None and out.stage_id == 0 and out.audio is None
    assert list(out.stage_outputs[0].outputs[0].token_ids) == reference[0]
    assert out.stage_outputs[0].outputs[0].hidden_states is None  # nothing captured for stages it skips


def test_an_unknown_voice_fails_the_request_naming_voice(omni, prompts):  # noqa: F811
    prompt = {"prompt": prompts["text"], "voice": "Nobody"}
    (out,) = omni.generate([prompt], [THINKER, TALKER, {}], use_tqdm=False)
    assert "voice must be one of ['Chelsie', 'Ethan'], got 'Nobody'" in out.error
