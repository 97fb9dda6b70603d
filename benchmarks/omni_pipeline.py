"""Omni pipelines, measured side by side in one run: pipelining, hand-off overhead, AR stage cost.

1. pipelining: REQUESTS requests through AR (Qwen3, hidden 512, 4 layers, random; a different max_tokens
   per request so they finish apart) -> DiT (tiny SD3), end-to-end throughput vs the standalone throughput
   of the slower stage (each stage alone, same engine, own process, same inputs). Each stage has its own
   core (``cpus``, --ar-cpus 0 --dit-cpus 1), as each would have its own GPU: stages sharing cores
   compete and no pipeline can beat the sum of their times. Goal >= 0.9x.
2. handoff: a float32 tensor of MIB MiB (4 and 64 by default) made in stage 0 and handed to stage 1 through
   the stage manager (two ``echo`` stages: real processes and channels, no model), shared memory against
   plain pickling; and the end-to-end latency of one request through the hidden-state pipeline (AR prompt
   hidden states -> tiny Z-Image at SIZE x SIZE, STEPS steps: the tiny model's own hand-off is far below
   4 MiB, hence the separate measurement). Overhead = hand-off / end-to-end latency. Goal < 2%.
3. ar: the AR stage alone inside OmniLLM vs plain vllm.LLM on the same model and prompts (AR_REQUESTS of
   64 prompt + 64 generated tokens), alternating rounds (medians). Goal >= 0.97x.

Usage: python benchmarks/omni_pipeline.py [--quick] [--only pipelining|handoff|ar] [--requests 16]
       [--rounds 3] [--mib 4 64] [--size 128] [--steps 20] [--ar-requests 64]
--quick: 4 requests, one round, a 4 MiB hand-off, 32 px and 2 steps, 4 AR requests (engine starts dominate).
Run it on a quiet machine: other processes on the 2 cores move every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import harness

from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.testing.tiny_models import build_qwen3, tiny_model_path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
AR_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=64, enforce_eager=True)
DIT = dict(num_inference_steps=8, height=64, width=64)


def small_qwen3(tmp: Path) -> str:
    """A random Qwen3 big enough that its compute, not per-request overhead, dominates."""
    build_qwen3(tmp / "qwen3", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64)  # fmt: skip
    return str(tmp / "qwen3")


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


# ---- 1. pipelining ---------------------------------------------------------------------------------
def pipelining(args, qwen3: str) -> None:
    prompts = [f"Describe picture number {i}:" for i in range(args.requests)]
    ar_params = [
        {"temperature": 0.0, "max_tokens": 8 + 2 * i, "ignore_eos": True} for i in range(args.requests)
    ]
    dit_params = [{"seed": i} for i in range(args.requests)]
    ar = create_ar_stage_config(0, qwen3, cpus=args.ar_cpus, **AR_ARGS)
    pipeline = OmniLLM([ar, create_dit_stage_config(1, tiny_model_path("sd3"), cpus=args.dit_cpus, **DIT)])
    ar_alone = OmniLLM([ar])
    dit_alone = OmniLLM([create_dit_stage_config(0, tiny_model_path("sd3"), cpus=args.dit_cpus, **DIT)])
    texts = [{"prompt": o.text} for o in ar_alone.generate(prompts, ar_params, use_tqdm=False)]
    rows = []
    for _ in range(args.rounds):
        t_ar, _ = timed(ar_alone.generate, prompts, ar_params, False)
        t_dit, _ = timed(dit_alone.generate, texts, dit_params, False)
        t_all, _ = timed(pipeline.generate, prompts, [ar_params, dit_params], False)
        rows.append((t_ar, t_dit, t_all))
    for omni in (pipeline, ar_alone, dit_alone):
        omni.close()
    t_ar, t_dit, t_all = (statistics.median(column) for column in zip(*rows, strict=True))
    slowest = max(t_ar, t_dit)
    print(f"pipelining, {args.requests} requests (median of {args.rounds}):")
    n = args.requests
    print(f"  AR stage alone {n / t_ar:.2f} req/s, DiT stage alone {n / t_dit:.2f} req/s")
    print(f"  pipeline {n / t_all:.2f} req/s = {slowest / t_all:.3f}x the slower stage (goal >= 0.9)")
    harness.headline("pipelining: AR -> DiT throughput / the slower stage alone", slowest / t_all, ">= 0.9")


# ---- 2. hand-off overhead --------------------------------------------------------------------------
def handoff_seconds(mib: int, threshold: int, repeats: int) -> float:
    """Median time from a tensor made in stage 0 to stage 1 holding it, through the stage manager (two
    ``echo`` stages: the real processes, channels and stage-input function, no model)."""
    import vllm_omni.testing.echo_stage  # noqa: F401  (registers the echo kind)
    from vllm_omni import OmniStageConfig

    first = OmniStageConfig(0, "echo", "none", ["latent"], ["latent"])
    stages = [first, OmniStageConfig(1, "echo", "none", ["latent"], ["latent"], stage_input="echo_tensor")]
    omni = OmniLLM(stages, shm_threshold=threshold)
    times = []
    for _ in range(repeats + 2):  # two warm-up requests
        out = omni.generate({"nbytes": mib << 20}, use_tqdm=False)[0]
        times.append(out.stage_outputs[1].handoff_seconds)
    omni.close()
    return statistics.median(times[2:])


def handoff(args) -> None:
    print(f"hand-off of a float32 tensor, stage 0 -> manager -> stage 1 (median of {args.rounds * 5}):")
    seconds = {}
    for mib in args.mib:
        seconds[mib] = shm = handoff_seconds(mib, 1 << 20, args.rounds * 5)
        pickled = handoff_seconds(mib, 1 << 62, args.rounds * 5)
        print(f"  {mib:3d} MiB: shared memory {shm * 1e3:7.2f} ms (written once, passed on by name), "
              f"pickled through the channels {pickled * 1e3:7.2f} ms ({pickled / shm:.1f}x)")  # fmt: skip
        harness.headline(f"hand-off of {mib} MiB: pickled / shared memory", pickled / shm)
    ar = create_ar_stage_config(0, tiny_model_path("qwen3"), ["text"], ["hidden_states"],
                                stage_input="chat_template", prompt_hidden_states_layer=-2,
                                **AR_ARGS)  # fmt: skip
    size = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
    dit = create_dit_stage_config(1, tiny_model_path("z_image"), ["hidden_states"], ["image"], **size)
    omni = OmniLLM([ar, dit])
    params = [{"max_tokens": 1}, {"seed": 0}]
    omni.generate("warm up", params, use_tqdm=False)
    latency = statistics.median(timed(omni.generate, f"a red sunset {i}", params, False)[0] for i in range(5))
    omni.close()
    share = 100 * seconds[min(args.mib)] / latency
    print(f"  hidden-state pipeline ({args.size}x{args.size}, {args.steps} steps) end-to-end latency "
          f"{latency * 1e3:.0f} ms per request; a {min(args.mib)} MiB hand-off = {share:.2f}% of it "
          "(goal < 2%)")  # fmt: skip
    harness.headline(f"hand-off of {min(args.mib)} MiB / hidden-state pipeline latency, %", share, "< 2%")


# ---- 3. AR stage cost ------------------------------------------------------------------------------
def ar_stage(args, qwen3: str) -> None:
    from vllm import LLM, SamplingParams

    n = args.ar_requests
    prompts = [{"prompt_token_ids": list(range(10 + i, 74 + i))} for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    omni = OmniLLM([create_ar_stage_config(0, qwen3, **AR_ARGS)])
    llm = LLM(qwen3, **AR_ARGS)
    tokens = n * (64 + 64)
    ours, stock = [], []
    for _ in range(args.rounds + 1):  # the first round warms both up
        ours.append(tokens / timed(omni.generate, prompts, params, False)[0])
        stock.append(tokens / timed(lambda: llm.generate(prompts, params, use_tqdm=False))[0])
    omni.close()
    llm.llm_engine.engine_core.shutdown()
    ours, stock = statistics.median(ours[1:]), statistics.median(stock[1:])
    print(f"AR stage, {n} requests x (64 prompt + 64 generated) tokens (median of {args.rounds}):")
    print(
        f"  vllm.LLM {stock:.0f} tok/s, inside OmniLLM {ours:.0f} tok/s = {ours / stock:.3f}x (goal >= 0.97)"
    )
    harness.headline("AR stage: tokens/s inside OmniLLM / vllm.LLM", ours / stock, ">= 0.97")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("pipelining", "handoff", "ar"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ar-cpus", default="0", help="pipelining: the AR stage's cores ('' = all)")
    parser.add_argument("--dit-cpus", default="1", help="pipelining: the DiT stage's cores ('' = all)")
    parser.add_argument("--mib", type=int, nargs="+", default=[4, 64], help="hand-off tensor sizes")
    parser.add_argument("--size", type=int, default=128, help="hand-off pipeline: image size")
    parser.add_argument("--steps", type=int, default=20, help="hand-off pipeline: denoising steps")
    parser.add_argument("--ar-requests", type=int, default=64, help="ar: requests per round")
    args = harness.parse_args(parser, requests=4, rounds=1, mib=[4], size=32, steps=2, ar_requests=4)
    harness.config(f"{args.requests} pipelined requests, {args.rounds} rounds, hand-off {args.mib} MiB, "
                   f"Z-Image {args.size} px {args.steps} steps, {args.ar_requests} AR requests")  # fmt: skip
    args.ar_cpus, args.dit_cpus = args.ar_cpus or None, args.dit_cpus or None
    with tempfile.TemporaryDirectory() as tmp:
        qwen3 = small_qwen3(Path(tmp)) if args.only != "handoff" else ""
        if args.only in (None, "pipelining"):
            pipelining(args, qwen3)
        if args.only in (None, "handoff"):
            handoff(args)
        if args.only in (None, "ar"):
            ar_stage(args, qwen3)


if __name__ == "__main__":
    main()
