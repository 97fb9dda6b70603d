"""The ``code2wav`` engine on the tiny Qwen2.5-Omni: transformers' token2wav's waveform for the same codes,
voice and seed; a request's audio alone == among 8 concurrent ones; chunked audio vs whole; refused input;
aborts; a one-stage OmniLLM / AsyncOmniLLM (whole and streamed in chunks).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from vllm_omni import AsyncOmniLLM, OmniLLM
from vllm_omni.audio.code2wav_engine import Code2WavEngine
from vllm_omni.audio.code2wav_request import Code2WavParams
from vllm_omni.config.code2wav import Code2WavConfig
from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.pipeline.stage_input import StageInput, check_pipeline, get_stage_input, stage_input_of
from vllm_omni.testing.tiny_models import tiny_model_path

SAMPLES_PER_CODE = 2 * 240  # the DiT's 2 mel frames per code, BigVGAN's 240 samples per frame
FAST = {"num_steps": 4}  # 3 RK4 steps: what batching and chunking tests need, at a third of the time
BATCH_TOLERANCE = 1e-5  # batched vs alone, max abs difference (measured 3.7e-6): BLAS blocking differs
CHUNK_BOUND = 1e-4  # chunked (12 codes, contexts 24 / 12) vs whole on the tiny model (measured 2.1e-6)


def codes(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8447, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model_path("qwen2_5_omni")


@pytest.fixture(scope="module")
def engine(path) -> Code2WavEngine:
    return Code2WavEngine(path, Code2WavConfig())


def run(engine: Code2WavEngine, requests: dict[str, tuple[list[int], Code2WavParams]]) -> dict[str, list]:
    """Every output of each request, stepping until the engine is idle."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, {"codes": ids}, params)
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def whole(engine: Code2WavEngine, ids: list[int], **params) -> np.ndarray:
    (output,) = run(engine, {"r": (ids, Code2WavParams(**params))})["r"]
    assert output.finished and output.sample_offset == 0
    return output.waveform


@pytest.fixture(scope="module")
def hf(path):
    """transformers' whole model, its voices loaded, float32."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("voice", ["Chelsie", "Ethan"])
def test_waveform_is_transformers_token2wav(engine, hf, voice):
    ids, speaker = codes(24, seed=1), hf.speaker_map[voice]
    torch.manual_seed(7)  # token2wav draws its initial noise from the global generator
    with torch.no_grad():
        reference = hf.token2wav(
            torch.tensor([ids]),
            conditioning=speaker["cond"].float(),
            reference_mel=speaker["ref_mel"].float(),
        ).numpy()
    waveform = whole(engine, ids, voice=voice, seed=7)
    assert waveform.dtype == np.float32 and waveform.shape == (24 * SAMPLES_PER_CODE,)
    np.testing.assert_array_equal(waveform, reference)  # measured: max abs difference 0.0


def test_a_request_sounds_the_same_alone_and_among_8(engine):
    requests = {
        f"r{i}": (
            codes(24 if i < 6 else 12, seed=i),
            Code2WavParams(["Chelsie", "Ethan"][i % 2], seed=i, **FAST),
        )
        for i in range(8)
    }
    together = run(engine, requests)
    for request_id in ("r0", "r3", "r7"):
        alone = run(engine, {request_id: requests[request_id]})[request_id][0].waveform
        np.testing.assert_allclose(together[request_id][0].waveform, alone, rtol=0, atol=BATCH_TOLERANCE)


def test_chunked_audio_vs_whole(engine):
    ids = codes(36, seed=3)
    reference = whole(engine, ids, seed=5, **FAST)
    chunks = run(engine, {"r": (ids, Code2WavParams(seed=5, chunk_size=12, emit_chunks=True, **FAST))})["r"]
    assert [(c.sample_offset, c.finished) for c in chunks] == [
        (i * 12 * SAMPLES_PER_CODE, i == 2) for i in range(3)
    ]
    streamed = np.concatenate([c.waveform for c in chunks])
    assert streamed.shape == reference.shape
    assert 0 < np.abs(streamed - reference).max() < CHUNK_BOUND
    # Context reaching both ends makes every window the whole sequence: the same audio, exactly.
    wide = Code2WavParams(seed=5, chunk_size=12, left_context=36, right_context=36, **FAST)
    np.testing.assert_array_equal(whole(engine, ids, **vars(wide)), reference)


def test_codes_given_as_they_come_make_the_same_chunks(engine):
    """An open request (a talker still generating): each chunk is made as soon as its codes and right
    context are known, with the window and noise of the whole input; the audio equals the request given
    every code at once, exactly."""
    ids = codes(40, seed=6)
    params = Code2WavParams(seed=2, chunk_size=12, emit_chunks=True, **FAST)
    reference = np.concatenate([c.waveform for c in run(engine, {"r": (ids, params)})["r"]])
    engine.add_request("open", {"codes": ids[:5]}, params, open=True)
    made = {}  # known codes -> chunks made then
    for known in range(5, 41):
        engine.extend_request("open", {"codes": ids[:known]}, done=known == 40)
        while engine.has_unfinished_requests():
            made.setdefault(known, []).extend(engine.step())
    ready = {known: [c.sample_offset // SAMPLES_PER_CODE for c in chunks] for known, chunks in made.items()}
    assert {k: v for k, v in ready.items() if v} == {24: [0], 36: [12], 40: [24, 36]}  # 12 + 12 right context
    assert made[40][-1].finished and not any(c.finished for c in made[24] + made[36])
    np.testing.assert_array_equal(
        np.concatenate([c.waveform for c in made[24] + made[36] + made[40]]), reference
    )
    with pytest.raises(ValueError, match="must extend the 3 codes it has"):
        engine.add_request("o2", {"codes": ids[:3]}, params, open=True)
        engine.extend_request("o2", {"codes": ids[1:5]}, done=False)
    engine.abort_requests(["o2"])
    assert not engine.has_unfinished_requests() and (engine.running, engine.waiting) == ([], [])


def test_refused_input_names_the_field_and_the_engine_keeps_serving(engine):
    for prompt, params, message in (
        ({"codes": [1, 2]}, Code2WavParams(voice="Nobody"), r"voice must be one of \['Chelsie', 'Ethan'\]"),
        ({"codes": [1, 9000]}, Code2WavParams(), r"codes must be in \[0, 8448\), got 9000"),
        ({"codes": []}, Code2WavParams(), "codes must be a non-empty list"),
        ({"codes": [1]}, Code2WavParams(num_steps=1), "num_steps must be an integer >= 2"),
        ({"codes": [1]}, Code2WavParams(chunk_size=0), "chunk_size must be an integer >= 1"),
        ([1, 2], Code2WavParams(), r"a code2wav prompt is \{'codes'"),
        ({"codes": [1], "speaker": "Ethan"}, Code2WavParams(), r"a code2wav prompt is \{'codes'"),
        ({"codes": [1], "voice": "Nobody"}, Code2WavParams(), r"voice must be one of \['Chelsie', 'Ethan'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()
    assert whole(engine, codes(4, seed=0), **FAST).shape == (4 * SAMPLES_PER_CODE,)


def test_a_prompts_voice_takes_the_place_of_the_params_voice(engine):
    ids = codes(8, seed=4)
    engine.add_request("p", {"codes": ids, "voice": "Ethan"}, Code2WavParams(voice="Chelsie", **FAST))
    (from_prompt,) = [o for o in engine.step() if o.request_id == "p"]
    np.testing.assert_array_equal(from_prompt.waveform, whole(engine, ids, voice="Ethan", **FAST))
    assert not np.array_equal(from_prompt.waveform, whole(engine, ids, voice="Chelsie", **FAST))


def test_aborts_free_the_requests(engine):
    engine.add_request("a", {"codes": codes(24, 0)}, Code2WavParams(chunk_size=12, emit_chunks=True, **FAST))
    engine.add_request("b", {"codes": codes(8, 1)}, Code2WavParams(**FAST))
    assert [o.request_id for o in engine.step()] == ["a", "b"]  # a's first chunk, b whole
    engine.abort_requests(["a"])
    assert (engine.running, engine.waiting, engine.step()) == ([], [], [])


def test_one_stage_pipelines_whole_and_streamed(engine, path):
    ids, params = codes(36, seed=2), {"seed": 3, "chunk_size": 12, **FAST}
    reference = run(engine, {"r": (ids, Code2WavParams(**params))})["r"][0].waveform
    stage = OmniStageConfig(0, "code2wav", path, ["audio_codes"], engine_args={"max_batch_size": 4})
    omni = OmniLLM([stage])
    try:
        (out,) = omni.generate([{"codes": ids}], params, use_tqdm=False)
    finally:
        omni.close()
    assert out.error is None and out.audio.dtype == np.float32
    np.testing.assert_array_equal(out.audio, reference)

    omni = AsyncOmniLLM([stage])

    async def stream():
        return [(len(o.audio), o.finished) async for o in omni.generate({"codes": ids}, params)]

    try:
        sizes = asyncio.run(stream())
        assert asyncio.run(omni.stage_stats(0)) == {"running": 0, "waiting": 0}
    finally:
        omni.shutdown()
    assert sizes == [(12 * SAMPLES_PER_CODE, False), (24 * SAMPLES_PER_CODE, False), (len(reference), True)]


def test_stage_config_checks(path):
    with pytest.raises(ValueError, match=r"code2wav engine_args has unknown key\(s\) \['steps'\]"):
        OmniStageConfig(0, "code2wav", path, ["audio_codes"], engine_args={"steps": 4})
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        OmniStageConfig(0, "code2wav", path, ["audio_codes"], engine_args={"max_batch_size": 0})
    with pytest.raises(ValueError, match=r"a 'code2wav' stage consumes \['audio_codes'\], not \['text'\]"):
        OmniStageConfig(0, "code2wav", path)
    assert OmniStageConfig(0, "code2wav", path, ["audio_codes"]).output_modalities == ["audio"]


def test_an_ar_stage_hands_its_tokens_on_as_codes_without_the_end_token(path):
    from vllm import CompletionOutput, RequestOutput

    talker = OmniStageConfig(0, "ar", path, output_modalities=["audio_codes"])
    code2wav = OmniStageConfig(1, "code2wav", path, ["audio_codes"])
    check_pipeline([talker, code2wav])
    assert stage_input_of([talker, code2wav], code2wav) == "codes"
    codes = get_stage_input("codes")
    for finish_reason, stop_reason, expected in (
        ("stop", None, [5, 6]),  # the model's end token
        ("stop", 8294, [5, 6]),  # another end token (stop_token_ids)
        ("stop", "</s>", [5, 6, 8292]),  # a stop string: no end token among the ids
        ("length", None, [5, 6, 8292]),
    ):
        completion = CompletionOutput(
            0, "", [5, 6, 8292], None, None, finish_reason=finish_reason, stop_reason=stop_reason
        )
        source = RequestOutput("r", None, [1], None, [completion], finished=True)
        assert codes(StageInput(None, {0: source}, code2wav)) == {"codes": expected}
    with_voice = StageInput({"prompt": "hi", "voice": "Ethan"}, {0: source}, code2wav)
    assert codes(with_voice) == {"codes": [5, 6, 8292], "voice": "Ethan"}  # the request's voice goes along


def test_waveforms_encode_as_wav_pcm16_and_flac(tmp_path):
    import io
    import wave

    import soundfile

    from vllm_omni.audio.wav import encode, save_wav
    from vllm_omni.pipeline.outputs import OmniRequestOutput

    waveform = np.sin(np.linspace(0, 200, 2400, dtype=np.float32)) * 1.2  # beyond [-1, 1]: clipped
    expected = (np.clip(waveform, -1, 1) * 32767).round().astype("<i2")
    assert np.array_equal(np.frombuffer(encode(waveform, "pcm16"), "<i2"), expected)
    with wave.open(io.BytesIO(encode(waveform, "wav"))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        assert np.array_equal(np.frombuffer(wav.readframes(wav.getnframes()), "<i2"), expected)
    flac, rate = soundfile.read(io.BytesIO(encode(waveform, "flac")), dtype="float32")
    assert rate == 24000 and np.abs(flac - np.clip(waveform, -1, 1)).max() < 1e-4
    with pytest.raises(ValueError, match=r"must be one of \['wav', 'pcm16', 'flac'\], got 'mp3'"):
        encode(waveform, "mp3")
    written = OmniRequestOutput("r", None, audio=waveform).save_wav(tmp_path / "a.wav")
    assert written.read_bytes() == save_wav(tmp_path / "b.wav", waveform).read_bytes()
    with pytest.raises(ValueError, match="request r has no audio"):
        OmniRequestOutput("r", None).save_wav(tmp_path / "c.wav")
