"""Qwen2.5-Omni speech under load: our thinker -> talker -> code2wav pipeline vs transformers' ``generate``.

The tiny Qwen2.5-Omni checkpoint (random weights), float32, REQUESTS different text chats in voice Ethan,
each with the same budgets on both sides: a greedy thinker of THINKER new tokens (ours ``ignore_eos``,
transformers' ``thinker_min_new_tokens``) and a greedy talker of at most TALKER codes (its stop codes and
repetition penalty kept on both sides, so both make the same codes; the run checks the audio lengths).

1. throughput: transformers' whole-model ``generate`` one request after another vs ``AsyncOmniLLM`` with
   every request submitted at once; requests/s, ours / transformers (aim >= 2x on CPU). transformers runs
   on HF_THREADS torch threads (1 by default: on the tiny model one thread beats two, 0.10 s a request
   against >= 0.14 s, and two threads slow down up to 100x whenever anything else runs on the 2 cores).
   Our stages run as ``qwen2_5_omni_stages`` makes them (no ``cpus``: each its own process, all cores).
2. real-time factor, seconds of compute per second of audio: one request alone (submit to its last sample
   / its audio), under load (the batch's wall time / all its audio), transformers' sequential run alike.
3. time to first audio: code2wav making CHUNK codes per chunk (``{"chunk_size": CHUNK}``), each chunk a
   snapshot: submit to the first snapshot holding audio, one request alone and the median under load.
   The talker hands its codes on when it has finished, so a first chunk waits for the whole talker; and
   code2wav runs 8 requests at a time (``max_batch_size``), chunk by chunk, the others waiting for them.

Each round alternates the contenders (transformers' run, our batch, our request alone, then the chunked
ones); medians over ROUNDS rounds, after one warm-up of each.

Usage: python benchmarks/omni_speech.py [--quick] [--requests 16] [--rounds 3] [--thinker 16] [--talker 64]
       [--chunk 16] [--hf-threads 1]
--quick: 4 requests, one round, 4 thinker tokens, 16 codes, chunks of 8 (engine starts dominate).
Run it on a quiet machine: other processes on the 2 cores move every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import harness
import torch
from vllm import SamplingParams

from vllm_omni import AsyncOmniLLM
from vllm_omni.audio.code2wav_request import SAMPLE_RATE
from vllm_omni.pipeline.qwen2_5_omni_stages import qwen2_5_omni_stages
from vllm_omni.testing.tiny_models import tiny_model_path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
VOICE = "Ethan"
QUESTIONS = (
    "What is the capital of France?", "Tell me a joke about cats.", "Count from one to ten.",
    "Why is the sky blue?", "Write a haiku about the sea.", "How do bees make honey?",
    "Name three rivers in Europe.", "What is a prime number?", "Describe a sunset in one sentence.",
    "How far away is the Moon?", "What does a compiler do?", "Give me a recipe for pancakes.",
    "Why do cats purr?", "What is the speed of sound?", "Say hello in five languages.",
    "Who wrote Hamlet, and when?",
)  # fmt: skip


@dataclass
class Timing:
    """One request of ours: seconds from submit to its first audio and to its end, and its audio."""

    first_audio: float
    latency: float
    samples: int


def chat_prompts(processor, count: int) -> list[str]:
    """``count`` different text chats rendered by the checkpoint's template (questions cycled, numbered)."""
    texts = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i // len(QUESTIONS)})" for i in range(count)]
    chats = [[{"role": "user", "content": [{"type": "text", "text": text}]}] for text in texts]
    return [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]


@contextlib.contextmanager
def torch_threads(count: int):
    """This process's torch on ``count`` threads for the block, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transformers_run(hf, prompts: list[str], args) -> tuple[float, list[int]]:
    """transformers' ``generate`` on each prompt in turn (``args.hf_threads`` threads): (seconds, audio
    samples per request)."""
    with torch_threads(args.hf_threads):
        return generate_in_turn(hf, prompts, args)


def generate_in_turn(hf, prompts: list[str], args) -> tuple[float, list[int]]:
    """One whole-model ``generate`` per prompt, greedy, the budgets of ``args``, token2wav seeded by index."""
    model, processor = hf
    budgets = dict(
        thinker_max_new_tokens=args.thinker, thinker_min_new_tokens=args.thinker, thinker_do_sample=False,
        talker_max_new_tokens=args.talker, talker_do_sample=False,
    )  # fmt: skip
    start, samples = time.perf_counter(), []
    for seed, prompt in enumerate(prompts):
        inputs = processor(text=prompt, return_tensors="pt")
        torch.manual_seed(seed)  # token2wav's noise, as ours draws it from the request's seed
        with torch.no_grad():
            _, audio = model.generate(**inputs, speaker=VOICE, **budgets)
        samples.append(audio.numel())
    return time.perf_counter() - start, samples


def stage_params(args, seed: int, chunk: int | None) -> list:
    """One request's params per stage: the budgets, the code2wav seed, chunks of ``chunk`` codes."""
    thinker = SamplingParams(temperature=0.0, max_tokens=args.thinker, ignore_eos=True)
    return [thinker, {"temperature": 0.0, "max_tokens": args.talker}, {"seed": seed, "chunk_size": chunk}]


async def one_request(omni: AsyncOmniLLM, prompt: str, params: list) -> Timing:
    """Submit one request and follow its snapshots to the end."""
    start, first, out = time.perf_counter(), None, None
    async for out in omni.generate({"prompt": prompt, "voice": VOICE}, params):
        if first is None and out.audio is not None:
            first = time.perf_counter() - start
    if out.error is not None or out.audio is None:
        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
    return Timing(first, time.perf_counter() - start, len(out.audio))


def ours_run(omni: AsyncOmniLLM, prompts: list[str], args, chunk: int | None) -> tuple[float, list[Timing]]:
    """Every prompt submitted at once: (seconds until the last finished, each request's timing)."""

    async def run_all() -> list[Timing]:
        requests = [one_request(omni, p, stage_params(args, seed, chunk)) for seed, p in enumerate(prompts)]
        return await asyncio.gather(*requests)

    start = time.perf_counter()
    timings = asyncio.run(run_all())
    return time.perf_counter() - start, timings


def rtf(seconds: float, samples: int) -> float:
    """Seconds of compute per second of audio."""
    return seconds / (samples / SAMPLE_RATE)


def one_round(hf, omni: AsyncOmniLLM, prompts: list[str], args) -> dict[str, float]:
    """Each contender once, in turn; this round's numbers by name."""
    t_hf, hf_samples = transformers_run(hf, prompts, args)
    t_ours, load = ours_run(omni, prompts, args, None)
    _, (alone,) = ours_run(omni, prompts[:1], args, None)
    _, (alone_chunked,) = ours_run(omni, prompts[:1], args, args.chunk)
    _, load_chunked = ours_run(omni, prompts, args, args.chunk)
    if hf_samples != [t.samples for t in load]:
        print(f"  warning: audio lengths differ (budgets?): transformers {hf_samples}, ours "
              f"{[t.samples for t in load]}")  # fmt: skip
    n = len(prompts)
    print(
        f"  round: transformers in turn {t_hf:.2f} s, ours all at once {t_ours:.2f} s ({t_hf / t_ours:.2f}x)"
    )
    return {
        "hf_rps": n / t_hf, "ours_rps": n / t_ours, "ratio": t_hf / t_ours,
        "audio_s": sum(hf_samples) / SAMPLE_RATE / n,
        "rtf_hf": rtf(t_hf, sum(hf_samples)), "rtf_alone": rtf(alone.latency, alone.samples),
        "rtf_load": rtf(t_ours, sum(t.samples for t in load)),
        "rtf_load_each": statistics.median(rtf(t.latency, t.samples) for t in load),
        "latency_alone": alone.latency, "ttfa_alone": alone_chunked.first_audio,
        "ttfa_load": statistics.median(t.first_audio for t in load_chunked),
        "ttfa_load_max": max(t.first_audio for t in load_chunked),
    }  # fmt: skip


def print_rows(m: dict[str, float], args) -> None:
    """The medians ``m`` for people."""
    print(
        f"Qwen2.5-Omni speech, tiny checkpoint float32, {args.requests} requests (median of {args.rounds} "
        f"rounds), {args.thinker} thinker tokens, <= {args.talker} codes ({m['audio_s']:.2f} s audio each):"
    )
    print(
        f"  throughput: transformers one after another {m['hf_rps']:.2f} req/s, ours all at once "
        f"{m['ours_rps']:.2f} req/s = {m['ratio']:.2f}x (aim >= 2)"
    )
    print(
        f"  real-time factor (compute s / audio s): ours alone {m['rtf_alone']:.3f}, ours under load "
        f"{m['rtf_load']:.3f} (each request's own latency: median {m['rtf_load_each']:.3f}), "
        f"transformers in turn {m['rtf_hf']:.3f}"
    )
    print(
        f"  time to first audio ({args.chunk}-code chunks): alone {m['ttfa_alone']:.3f} s (whole audio "
        f"{m['latency_alone']:.3f} s), under load median {m['ttfa_load']:.3f} s, "
        f"max {m['ttfa_load_max']:.3f} s"
    )


def print_headlines(m: dict[str, float], args) -> None:
    """The medians ``m`` for the report."""
    n = args.requests
    harness.headline(
        f"throughput, {n} requests: ours all at once / transformers' generate in turn", m["ratio"], ">= 2"
    )
    harness.headline("real-time factor, one request alone (compute s / audio s)", m["rtf_alone"])
    harness.headline(f"real-time factor under load, {n} requests (wall s / audio s)", m["rtf_load"])
    harness.headline("real-time factor, transformers' generate in turn (wall s / audio s)", m["rtf_hf"])
    harness.headline(f"time to first audio chunk, alone, s ({args.chunk} codes a chunk)", m["ttfa_alone"])
    harness.headline(f"time to first audio chunk under load, median of {n}, s", m["ttfa_load"])


def load_transformers(path: str):
    """transformers' whole Qwen2.5-Omni (thinker, talker, token2wav) and its processor, float32."""
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--thinker", type=int, default=16, help="thinker tokens a request")
    parser.add_argument("--talker", type=int, default=64, help="most codes a request (talker max_tokens)")
    parser.add_argument("--chunk", type=int, default=16, help="codes per streamed audio chunk")
    parser.add_argument("--hf-threads", type=int, default=1, help="transformers' torch threads")
    args = harness.parse_args(parser, requests=4, rounds=1, thinker=4, talker=16, chunk=8)
    harness.config(f"tiny Qwen2.5-Omni float32, {args.requests} requests, {args.rounds} rounds, "
                   f"{args.thinker} thinker tokens, <= {args.talker} codes, {args.chunk}-code chunks, "
                   f"transformers on {args.hf_threads} thread(s)")  # fmt: skip
    path = tiny_model_path("qwen2_5_omni")
    hf = load_transformers(path)
    prompts = chat_prompts(hf[1], args.requests)
    omni = AsyncOmniLLM(qwen2_5_omni_stages(path, dtype="float32", max_model_len=512, enforce_eager=True))
    try:
        transformers_run(hf, prompts[:1], args)  # warm-up
        for chunk in (None, args.chunk):
            ours_run(omni, prompts, args, chunk)
        rounds = [one_round(hf, omni, prompts, args) for _ in range(args.rounds)]
    finally:
        omni.shutdown()
    medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    print_rows(medians, args)
    print_headlines(medians, args)


if __name__ == "__main__":
    main()
