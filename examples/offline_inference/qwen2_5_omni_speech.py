"""Qwen2.5-Omni answers in text and speech: thinker -> talker -> code2wav, one pipeline from the model folder.

Runs on the tiny random Qwen2.5-Omni by default (no download) and writes one WAV file per question; random
weights make random text and noise: the point is the path. With the real model (a GPU):

    python examples/offline_inference/qwen2_5_omni_speech.py --model Qwen/Qwen2.5-Omni-7B --voice Ethan
"""

import argparse
import os
from pathlib import Path

from vllm import SamplingParams

from vllm_omni import OmniLLM

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU

QUESTIONS = ["What is the capital of France?", "Tell me a short story."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Qwen2.5-Omni folder or hub id (default: the tiny one)")
    parser.add_argument("--voice", default="Chelsie", help="a voice of the model's spk_dict.pt")
    parser.add_argument("--max-tokens", type=int, default=16, help="the thinker's reply length")
    parser.add_argument("--out", default="outputs", help="folder for the WAV files")
    args = parser.parse_args()
    if args.model is None:
        from vllm_omni.testing.tiny_models import tiny_model_path

        args.model = tiny_model_path("qwen2_5_omni")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    chats = [[{"role": "user", "content": [{"type": "text", "text": q}]}] for q in QUESTIONS]
    prompts = [
        {
            "prompt": processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
            "voice": args.voice,
        }
        for chat in chats
    ]
    omni = OmniLLM(args.model)  # the folder says thinker, talker and token2wav: three stages
    # One entry per stage: the thinker's sampling, the talker's defaults (transformers'), code2wav's seed.
    thinker = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0)
    outputs = omni.generate(prompts, [thinker, None, {"seed": 0}])
    Path(args.out).mkdir(exist_ok=True)
    for i, (question, out) in enumerate(zip(QUESTIONS, outputs, strict=True)):
        path = out.save_wav(Path(args.out) / f"qwen2_5_omni_{i}.wav")
        seconds = len(out.audio) / 24000
        print(f"{question!r}\n  text: {out.text!r}\n  speech: {seconds:.2f} s in {path} ({args.voice})")
    omni.close()


if __name__ == "__main__":
    main()
