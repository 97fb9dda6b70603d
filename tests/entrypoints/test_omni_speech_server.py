"""`vllm serve <Qwen2.5-Omni> --omni` answers in speech: chat with ``modalities: ["text", "audio"]``
(whole and streamed, through the official ``openai`` client), ``POST /v1/audio/speech``, audio from
``/generate``; bad audio fields are 400 naming them, and a client that goes away mid-audio frees every
stage (tiny checkpoint, float32, CPU)."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import soundfile

from tests.utils import running_server
from vllm_omni.audio.code2wav_request import SAMPLE_RATE
from vllm_omni.entrypoints.openai.speech import speech_prompt
from vllm_omni.pipeline.qwen2_5_omni import REPLY_IN_PROMPT
from vllm_omni.testing.tiny_models import tiny_model_path

pytestmark = pytest.mark.engine

SAMPLES_PER_CODE = 2 * 240  # the DiT's 2 mel frames per code, BigVGAN's 240 samples per frame
MESSAGES = [{"role": "user", "content": "Say something."}]
GREEDY = {"model": "omni", "messages": MESSAGES, "max_tokens": 5, "temperature": 0.0}
SPEAK = {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}}


@pytest.fixture(scope="module")
def url():
    with running_server(tiny_model_path("qwen2_5_omni"), "--omni", "--dtype", "float32",
                        "--served-model-name", "omni") as served:  # fmt: skip
        yield served


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def post(url: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=300, **kwargs)


def test_a_chat_answer_with_audio_has_text_and_a_wav(client):
    text_only = client.chat.completions.create(**GREEDY, extra_body={"ignore_eos": True})
    spoken = client.chat.completions.create(**GREEDY, **SPEAK, extra_body={"ignore_eos": True})
    message = spoken.choices[0].message
    assert message.content == text_only.choices[0].message.content  # the thinker's answer, unchanged
    assert text_only.choices[0].message.audio is None
    assert message.audio.id.startswith("audio_") and message.audio.transcript == message.content
    assert message.audio.expires_at > time.time()
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == SAMPLE_RATE and samples.ndim == 1 and len(samples) % SAMPLES_PER_CODE == 0
    assert 0 < len(samples) and np.abs(samples).max() > 0


def test_flac_and_pcm16_formats(client):
    for audio_format in ("flac", "pcm16"):
        audio = {"voice": "Chelsie", "format": audio_format}
        answer = client.chat.completions.create(**GREEDY, modalities=["text", "audio"], audio=audio)
        data = base64.b64decode(answer.choices[0].message.audio.data)
        if audio_format == "pcm16":
            assert len(data) % (2 * SAMPLES_PER_CODE) == 0 and len(data) > 0
        else:
            samples, rate = soundfile.read(io.BytesIO(data))
            assert rate == SAMPLE_RATE and len(samples) % SAMPLES_PER_CODE == 0


def test_a_streamed_answer_sends_text_then_audio_chunks_then_the_finish(client):
    whole = client.chat.completions.create(**GREEDY, extra_body={"ignore_eos": True})
    audio = {"voice": "Ethan", "format": "pcm16"}
    stream = client.chat.completions.create(
        **GREEDY, modalities=["text", "audio"], audio=audio, stream=True, extra_body={"ignore_eos": True}
    )
    kinds, text, pcm, transcript, finish = [], "", b"", None, None
    for chunk in stream:
        (choice,) = chunk.choices
        delta_audio = choice.delta.audio  # the client's ChoiceDeltaAudio: id, data, transcript, expires_at
        if choice.delta.content:
            kinds.append("text")
            text += choice.delta.content
        if delta_audio is not None and delta_audio.data:
            kinds.append("audio")
            pcm += base64.b64decode(delta_audio.data)
        if delta_audio is not None and delta_audio.transcript is not None:
            kinds.append("transcript")
            transcript = delta_audio.transcript
        if choice.finish_reason is not None:
            kinds.append("finish")
            finish = choice.finish_reason
    assert text == whole.choices[0].message.content == transcript and finish == "length"
    first_audio = kinds.index("audio")
    assert set(kinds[:first_audio]) == {"text"} and kinds[-2:] == ["transcript", "finish"]
    assert kinds.count("audio") >= 2  # chunk by chunk (50 codes a chunk)
    assert len(pcm) > 0 and len(pcm) % (2 * SAMPLES_PER_CODE) == 0


def mp4_data_url(frames: np.ndarray, fps: int = 2) -> str:
    """``frames`` (T, H, W, 3 uint8) as an H.264 MP4 data URL (PyAV)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return f"data:video/mp4;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_a_video_part_is_answered_in_text_and_speech(client):
    frames = (np.random.RandomState(0).rand(2, 56, 56, 3) * 255).astype(np.uint8)  # a 434-token prompt
    video = {"type": "video_url", "video_url": {"url": mp4_data_url(frames)}}
    messages = [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]
    answer = client.chat.completions.create(**{**GREEDY, "messages": messages}, **SPEAK)
    message = answer.choices[0].message
    assert answer.usage.prompt_tokens > 100 and message.content  # the video's tokens are in the prompt
    assert len(base64.b64decode(message.audio.data)) > 0 and message.audio.transcript == message.content


BAD_CHATS = [
    ({"modalities": ["text", "audio"], "audio": {"voice": "Nobody", "format": "wav"}}, "audio.voice"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "mp3"}}, "audio.format"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}, "stream": True},
     "audio.format"),  # streamed audio is pcm16, as OpenAI streams it
    ({"modalities": ["text", "audio"]}, "audio"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "speed": 2}}, "audio"),
    ({"modalities": ["video"]}, "modalities"),
    ({"modalities": "audio"}, "modalities"),
    ({"audio": {"voice": "Ethan", "format": "wav"}}, "modalities"),  # audio without asking for it
    ({**SPEAK, "n": 2}, "n"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD_CHATS)
def test_bad_audio_fields_are_400_naming_them(url, fields, param):
    response = post(url, "/v1/chat/completions", {**GREEDY, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_speech_of_a_text_in_each_format(url, client):
    wav = post(url, "/v1/audio/speech", {"input": "Hello there.", "voice": "Chelsie"})
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(wav.content), dtype="float32")
    assert rate == SAMPLE_RATE and len(samples) % SAMPLES_PER_CODE == 0 and len(samples) > 0
    pcm = post(url, "/v1/audio/speech", {"input": "Hello there.", "voice": "Ethan", "response_format": "pcm"})
    assert pcm.headers["content-type"] == "audio/pcm" and len(pcm.content) % (2 * SAMPLES_PER_CODE) == 0
    flac = client.audio.speech.create(
        model="tts-1", voice="Ethan", input="Good morning", response_format="flac"
    )
    assert soundfile.read(io.BytesIO(flac.content))[1] == SAMPLE_RATE


def test_the_speech_prompt_gives_the_text_as_the_reply():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2_5_omni"))
    prompt = speech_prompt(tokenizer, "Hello there.", "Ethan")
    reply = tokenizer.encode("Hello there.", add_special_tokens=False)
    assert prompt["prompt_token_ids"][-len(reply) :] == reply and prompt[REPLY_IN_PROMPT] == len(reply)
    asking = tokenizer.decode(prompt["prompt_token_ids"][: -len(reply)])
    assert asking.endswith("Hello there.<|im_end|>\n<|im_start|>assistant\n") and prompt["voice"] == "Ethan"


BAD_SPEECH = [
    ({"input": "Hi", "voice": "Nobody"}, "voice"),
    ({"input": "Hi", "voice": "Ethan", "response_format": "mp3"}, "response_format"),
    ({"input": "", "voice": "Ethan"}, "input"),
    ({"input": "Hi", "voice": "Ethan", "speed": 1.5}, "speed"),
    ({"input": "Hi"}, "voice"),
    ({"input": "Hi", "voice": "Ethan", "instructions": "whisper"}, "instructions"),
]


@pytest.mark.parametrize(("body", "param"), BAD_SPEECH)
def test_bad_speech_requests_are_400_naming_the_field(url, body, param):
    response = post(url, "/v1/audio/speech", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_generate_returns_the_float_audio(url):
    body = {"prompt": {"prompt": "hi", "voice": "Ethan"}, "params": {"0": {"max_tokens": 4}}}
    answer = post(url, "/generate", body).json()
    audio = answer["audio"]
    samples = np.load(io.BytesIO(base64.b64decode(audio["data"])))
    assert audio["sample_rate"] == SAMPLE_RATE and samples.dtype == np.float32
    assert len(samples) == answer["stages"]["2"]["num_codes"] * SAMPLES_PER_CODE


def _open_audio_stream(url: str) -> socket.socket:
    """A streamed chat with audio, read up to its first audio chunk, then left open."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**GREEDY, "max_tokens": 40, "stream": True, "modalities": ["text", "audio"],
                       "audio": {"voice": "Ethan", "format": "pcm16"}}).encode()  # fmt: skip
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b'"audio": {"id"' not in received:  # mid-audio: the talker is done, code2wav runs
        received += sock.recv(65536)
    return sock


def _held_by_stages(url: str) -> int:
    stages = requests.get(f"{url}/info", timeout=30).json()["stages"]
    return sum(stats.get("unfinished", 0) + stats.get("running", 0) + stats.get("waiting", 0)
               for stats in (stage["stats"] for stage in stages))  # fmt: skip


def test_a_client_that_goes_away_frees_every_stage(url):
    sockets = [_open_audio_stream(url) for _ in range(3)]
    for sock in sockets:
        sock.close()
    deadline = time.monotonic() + 60
    while _held_by_stages(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _held_by_stages(url) == 0
    assert post(url, "/v1/audio/speech", {"input": "Still here.", "voice": "Ethan"}).status_code == 200


def test_the_speech_client_example_writes_three_wavs(url, tmp_path):
    example = Path(__file__).parents[2] / "examples" / "online_serving" / "omni_speech_client.py"
    command = [sys.executable, str(example), "--url", url, "--voice", "Ethan", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("answer", "streamed", "speech"):
        samples, rate = soundfile.read(tmp_path / f"{name}.wav")
        assert rate == SAMPLE_RATE and len(samples) > 0 and len(samples) % SAMPLES_PER_CODE == 0
    assert result.stdout.startswith("answer: ") and "streamed: " in result.stdout
