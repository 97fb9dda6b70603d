"""Talk to a Qwen2.5-Omni server with the official openai client: an answer in text and speech, the same
answer streamed (text, then audio chunks), and a text spoken (``/v1/audio/speech``); writes three WAV files.

Start a server first, e.g. on the tiny random Qwen2.5-Omni (no download; it answers gibberish and noise):
    python -m vllm_omni.testing.tiny_models --out tiny qwen2_5_omni
    vllm serve tiny/qwen2_5_omni --omni --max-model-len 512
or the real one: ``vllm serve Qwen/Qwen2.5-Omni-7B --omni``. Then:
    python examples/online_serving/omni_speech_client.py --url http://localhost:8000 --out answers
"""

import argparse
import base64
from pathlib import Path

import numpy as np
import openai

from vllm_omni.audio.wav import save_wav


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--prompt", default="Tell me a short joke.")
    parser.add_argument("--voice", default="Chelsie", help="Chelsie or Ethan")
    parser.add_argument("--out", default=".", help="folder for the WAV files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    model = client.models.list().data[0].id
    ask = {"model": model, "messages": [{"role": "user", "content": args.prompt}], "max_tokens": 32,
           "modalities": ["text", "audio"]}  # fmt: skip

    answer = client.chat.completions.create(**ask, audio={"voice": args.voice, "format": "wav"})
    message = answer.choices[0].message
    (out / "answer.wav").write_bytes(base64.b64decode(message.audio.data))
    print(f"answer: {message.content!r} -> {out / 'answer.wav'}")

    text, pcm = "", b""
    for chunk in client.chat.completions.create(
        **ask, audio={"voice": args.voice, "format": "pcm16"}, stream=True
    ):
        delta = chunk.choices[0].delta if chunk.choices else None
        text += (delta and delta.content) or ""
        pcm += base64.b64decode(delta.audio.data) if delta and delta.audio and delta.audio.data else b""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0  # 16-bit, 24 kHz mono
    save_wav(out / "streamed.wav", samples)
    print(f"streamed: {text!r}, {len(samples) / 24000:.2f} s of audio -> {out / 'streamed.wav'}")

    speech = client.audio.speech.create(
        model=model, voice=args.voice, input=args.prompt, response_format="wav"
    )
    (out / "speech.wav").write_bytes(speech.content)
    print(f"speech: {args.prompt!r} -> {out / 'speech.wav'}")


if __name__ == "__main__":
    main()
