"""Qwen2.5-Omni end to end from its folder: thinker -> talker -> code2wav (``qwen2_5_omni_stages``), float32
on the tiny checkpoint, against transformers' whole ``generate`` (greedy thinker and talker)."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from tests.entrypoints.test_hub_model_ids import serve_args
from tests.models.test_qwen2_5_omni_talker import hand_off, hf_runs, record_generate  # noqa: F401  (fixture)
from tests.models.test_qwen2_5_omni_tiny import CHATS, VLLM_MEDIA, hf, path, prompts, user  # noqa: F401  (fixtures)
from vllm_omni import AsyncOmniLLM, OmniLLM
from vllm_omni.entrypoints.cli.serve import stages_from_args
from vllm_omni.model_executor.models.qwen2_5_omni_talker import talker_hf_config
from vllm_omni.pipeline.model_pipelines import stages_for_model
from vllm_omni.pipeline.qwen2_5_omni import REPLY_IN_PROMPT
from vllm_omni.pipeline.qwen2_5_omni_stages import qwen2_5_omni_stages

pytestmark = pytest.mark.engine

VOICE, SEED = "Ethan", 3
THINKER_TOKENS, TALKER_TOKENS = 6, 24
THINKER = SamplingParams(temperature=0.0, max_tokens=THINKER_TOKENS, ignore_eos=True)
TALKER = {"temperature": 0.0, "max_tokens": TALKER_TOKENS}  # greedy, the talker's stops and penalty kept


@pytest.fixture(scope="module")
def omni(path):  # noqa: F811
    stages = qwen2_5_omni_stages(path, dtype="float32", max_model_len=512, enforce_eager=True)
    pipeline = OmniLLM(stages, keep_stage_outputs=True)  # the talker's codes too (stage_outputs[1])
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def async_omni(path):  # noqa: F811
    stages = qwen2_5_omni_stages(path, dtype="float32", max_model_len=512, enforce_eager=True)
    pipeline = AsyncOmniLLM(stages, keep_stage_outputs=True)  # the talker's output in each snapshot
    yield pipeline
    pipeline.shutdown()


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


def test_vllm_serve_engine_flags_are_the_thinkers(path):  # noqa: F811
    """``vllm serve MODEL --omni --max-model-len N``: the thinker's context; the talker keeps its own."""
    args = serve_args(path, "--omni", "--max-model-len", "1024", "--dtype", "float32")
    thinker, talker, _ = stages_from_args(args)
    assert thinker.engine_args["max_model_len"] == 1024 and "max_model_len" not in talker.engine_args
    assert talker.engine_args["dtype"] == "float32" and talker.engine_args["hf_overrides"] is talker_hf_config


def test_speech_equals_transformers_generate(omni, prompts, reference):  # noqa: F811
    ids, audio = reference
    (out,) = omni.generate(
        [{"prompt": prompts["text"], "voice": VOICE}], [THINKER, TALKER, {"seed": SEED}], use_tqdm=False
    )
    assert out.error is None and out.stage_id == 2
    assert list(out.stage_outputs[0].outputs[0].token_ids) == ids
    assert out.audio.dtype == np.float32 and out.audio.shape == audio.shape
    np.testing.assert_allclose(out.audio, audio, atol=1e-5)


def test_a_reply_given_in_the_prompt_is_spoken_as_if_generated(omni, hf, prompts, reference):  # noqa: F811
    """``reply_in_prompt`` (what ``/v1/audio/speech`` sends): the chat prompt followed by transformers' reply
    but its last token (which is never fed back), the thinker generating one token: the talker reads the
    same rows as after generating the reply, so the audio is transformers' own."""
    ids, audio = reference
    prompt_ids = hf[1].tokenizer(prompts["text"]).input_ids
    given = {"prompt_token_ids": prompt_ids + ids[:-1], "voice": VOICE, REPLY_IN_PROMPT: len(ids) - 1}
    thinker = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    (out,) = omni.generate([given], [thinker, TALKER, {"seed": SEED}], use_tqdm=False)
    assert out.error is None and list(out.stage_outputs[0].outputs[0].token_ids) == ids[-1:]
    np.testing.assert_allclose(out.audio, audio, atol=1e-5)


@pytest.mark.parametrize("name", ["image", "audio"])
def test_image_and_audio_chats_are_spoken_as_transformers_speaks_them(omni, prompts, hf_runs, name):  # noqa: F811
    """The whole pipeline on a media chat (vLLM's multimodal prompt): the thinker's ids and the talker's
    codes are transformers' whole ``generate``'s (greedy; its talker reads the media rows zeroed)."""
    prompt = {"prompt": prompts[name], "multi_modal_data": VLLM_MEDIA[name], "voice": VOICE}
    (out,) = omni.generate([prompt], [THINKER, TALKER, {"seed": SEED}], use_tqdm=False)
    assert out.error is None and out.audio is not None and len(out.audio) > 0
    assert list(out.stage_outputs[0].outputs[0].token_ids) == hf_runs[name]["output_ids"]
    assert list(out.stage_outputs[1].outputs[0].token_ids) == hf_runs[name]["codes"]


VIDEO = (np.random.RandomState(0).rand(2, 56, 56, 3) * 255).astype(np.uint8)  # 2 frames: a 434-token prompt


def test_a_video_chat_is_spoken_as_transformers_speaks_it(omni, hf):  # noqa: F811
    model, processor = hf
    prompt = processor.apply_chat_template(
        user("What happens?", {"type": "video"}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=prompt, videos=[VIDEO], return_tensors="pt")
    expected = hand_off(record_generate(model, inputs), inputs.input_ids.shape[1])
    given = {"prompt": prompt, "multi_modal_data": {"video": VIDEO}, "voice": VOICE}
    (out,) = omni.generate([given], [THINKER, TALKER, {"seed": SEED}], use_tqdm=False)
    assert out.error is None and len(out.audio) > 0
    assert list(out.stage_outputs[0].outputs[0].token_ids) == expected["output_ids"]
    assert list(out.stage_outputs[1].outputs[0].token_ids) == expected["codes"]


def test_a_text_only_request_skips_the_talker_and_code2wav(omni, prompts, reference):  # noqa: F811
    """Per prompt (``return_audio=False`` in transformers' words): one request text only, one with speech."""
    chats = [prompts["text"], {"prompt": prompts["text"], "voice": VOICE}]
    out, spoken = omni.generate(
        chats, [THINKER, TALKER, {"seed": SEED}], False, [["text"], ["text", "audio"]]
    )
    assert out.error is None and out.stage_id == 0 and out.audio is None
    assert list(out.stage_outputs[0].outputs[0].token_ids) == reference[0]
    assert out.stage_outputs[0].outputs[0].hidden_states is None  # nothing captured for stages it skips
    np.testing.assert_allclose(spoken.audio, reference[1], atol=1e-5)


def test_an_unknown_voice_fails_the_request_naming_voice(omni, prompts):  # noqa: F811
    prompt = {"prompt": prompts["text"], "voice": "Nobody"}
    (out,) = omni.generate([prompt], [THINKER, TALKER, {}], use_tqdm=False)
    assert "voice must be one of ['Chelsie', 'Ethan'], got 'Nobody'" in out.error


# The request of test_speech_equals_transformers_generate among 7 others: other texts, voices and seeds, and
# other thinker and talker lengths (the AR stages batch prompts and replies of different lengths; code2wav
# batches windows of one length, whatever the voice: the first two others' match the request's).
OTHERS = [  # (text or None for the text chat, voice, seed, thinker tokens, talker tokens)
    ("Tell me a joke about cats.", VOICE, 4, THINKER_TOKENS, TALKER_TOKENS),
    (None, "Chelsie", SEED, THINKER_TOKENS, TALKER_TOKENS),
    ("Count from one to ten.", VOICE, 5, 2, 8),
    ("Write a haiku about the sea, please, and explain it.", "Chelsie", 6, 12, 40),
    ("Hi.", VOICE, 7, 9, 16),
    ("Why is the sky blue?", "Chelsie", 8, 4, 32),
    ("Name three rivers in Europe and the seas they flow into.", VOICE, 9, 10, 12),
]


def among_others(hf, text_prompt: str) -> tuple[list[dict], list[list]]:  # noqa: F811
    """The 8 requests (the text chat, Ethan, seed SEED, at index 3) and their params per stage."""
    render = hf[1].apply_chat_template
    rows = [(None, VOICE, SEED, THINKER_TOKENS, TALKER_TOKENS), *OTHERS]
    rows.insert(3, rows.pop(0))
    requests, thinker, talker, code2wav = [], [], [], []
    for text, voice, seed, thinker_tokens, talker_tokens in rows:
        chat = text_prompt if text is None else render(user(text), add_generation_prompt=True, tokenize=False)
        requests.append({"prompt": chat, "voice": voice})
        thinker.append(SamplingParams(temperature=0.0, max_tokens=thinker_tokens, ignore_eos=True))
        talker.append({**TALKER, "max_tokens": talker_tokens})
        code2wav.append({"seed": seed})
    return requests, [thinker, talker, code2wav]


def test_a_requests_audio_is_the_same_alone_and_among_8_concurrent(omni, hf, prompts):  # noqa: F811
    (alone,) = omni.generate(
        [{"prompt": prompts["text"], "voice": VOICE}], [THINKER, TALKER, {"seed": SEED}], use_tqdm=False
    )
    outputs = omni.generate(*among_others(hf, prompts["text"]), use_tqdm=False)
    for out in outputs:
        assert out.error is None and out.audio is not None and out.audio.size > 0
    lengths = {len(out.audio) for out in outputs}
    assert len(lengths) > 2  # the talker's replies really differ in length
    batched = outputs[3]
    for stage in (0, 1):  # the thinker's text ids, the talker's codes
        ids = [list(out.stage_outputs[stage].outputs[0].token_ids) for out in (batched, alone)]
        assert ids[0] == ids[1]
    assert batched.audio.shape == alone.audio.shape
    # code2wav's DiT and BigVGAN in a batch of several round differently: max |difference| measured 3.2e-6
    # (float32, three runs alike); the bound is about 3x that.
    np.testing.assert_allclose(batched.audio, alone.audio, rtol=0, atol=1e-5)


LONG_TALKER = {"temperature": 0.0, "max_tokens": 400}  # greedy: 400 codes, ~1 s of talker on this CPU
CHUNKED = {"seed": SEED, "chunk_size": 16}


def test_code2wav_speaks_while_the_talker_generates(async_omni, omni, prompts):  # noqa: F811
    """Streaming, code2wav takes the codes as the talker makes them: the first chunk (16 codes and 12 of
    right context) comes while the talker is still generating, and the audio equals the same chunks made
    from every code at once (offline, where code2wav starts when the talker has finished), exactly."""
    prompt = {"prompt": prompts["text"], "voice": VOICE}
    params = [THINKER, LONG_TALKER, CHUNKED]

    async def stream() -> tuple:
        talker_at_first_audio = None
        async for out in async_omni.generate(prompt, params, "streamed"):
            if out.audio is not None and talker_at_first_audio is None:
                talker_at_first_audio = out.stage_outputs[1]
        return out, talker_at_first_audio

    out, talker_then = asyncio.run(stream())
    assert out.error is None and not talker_then.finished
    assert len(talker_then.outputs[0].token_ids) < len(out.stage_outputs[1].outputs[0].token_ids)
    (whole,) = omni.generate([prompt], params, use_tqdm=False)
    np.testing.assert_array_equal(out.audio, whole.audio)


def test_a_request_stopped_in_the_talker_and_code2wav_at_once_leaves_nothing(async_omni, prompts):  # noqa: F811
    prompt = {"prompt": prompts["text"], "voice": VOICE}

    async def stop_at_first_audio() -> tuple:
        outputs = async_omni.generate(prompt, [THINKER, LONG_TALKER, CHUNKED], "stopped")
        async with contextlib.aclosing(outputs):  # closed at the first audio: aborted in every stage
            async for out in outputs:
                if out.audio is not None:
                    break
        return out.stage_outputs[1].finished, [await async_omni.stage_stats(i) for i in range(3)]

    talker_done, (thinker, talker, code2wav) = asyncio.run(stop_at_first_audio())
    assert not talker_done  # it was in the talker and in code2wav
    assert thinker["unfinished"] == talker["unfinished"] == 0
    assert code2wav["running"] == code2wav["waiting"] == 0
