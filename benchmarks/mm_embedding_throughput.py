"""Throughput of multimodal-embedding return, side by side in one run (tiny LLaVA, CPU by default).

Three engines, each in its own process, same requests:
- stock:   vLLM with the patch layer off (VLLM_OMNI_DISABLE_PATCHES=1)
- off:     patched vLLM, feature off (the default)
- on:      patched vLLM, LLM(..., enable_return_mm_embedding=True)

Each configuration runs ``--passes`` times (a fresh engine each time, the order rotated between
passes, since engines started at different moments on a 2-core machine differ by more than the effect
measured); each run times ``--rounds`` batches and keeps the median. Prints requests/s per run, the
median per configuration, the ratios off/stock and on/off, embedding bytes returned per request, and
the peak RSS growth of the frontend + engine processes during the timed rounds.

    .venv/bin/python benchmarks/mm_embedding_throughput.py [--quick] [--requests 512] [--rounds 5]
        [--passes 3]

``--quick``: 16 requests, one round, one pass (three engine starts: about a minute on 2 cores).

``--profile`` measures the cost deterministically instead: each configuration runs one batch with
the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) under cProfile and reports Python function
calls (the same workload makes the same calls on every run) and the share of time spent in vllm_omni's
own code; ratios of calls against stock bound the overhead independent of machine noise.

On a 2-core CPU machine set ``VLLM_CPU_OMP_THREADS_BIND=1`` (the worker's threads on one core, the
frontend and EngineCore on the other): it narrows the spread between runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import harness

CONFIGS = {
    "stock": ({"VLLM_OMNI_DISABLE_PATCHES": "1"}, {}),
    "off": ({}, {}),
    "on": ({}, {"enable_return_mm_embedding": True}),
}


def rss_bytes() -> int:
    """Resident memory of this process and its children (EngineCore, workers)."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def run_config(model: str, engine_kwargs: dict, num_requests: int, rounds: int) -> dict:
    """Body of one configuration's process."""
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model, max_model_len=512, max_num_seqs=32, enforce_eager=True, **engine_kwargs)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(num_requests)]
    prompt = "<|im_start|>user\n<image>Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def requests(round_index: int):  # new pixels each round: no encoder/prefix cache across rounds
        shifted = [Image.fromarray(np.roll(np.asarray(im), round_index + 1)) for im in images]
        return [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in shifted]

    llm.generate(requests(-1)[:8], params, use_tqdm=False)  # warm-up
    if os.environ.get("OMNI_BENCH_PROFILE"):
        return profile_round(llm, requests(0), params)
    rss_before, rates, returned = rss_bytes(), [], 0
    for round_index in range(rounds):
        batch = requests(round_index)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        rates.append(len(batch) / (time.perf_counter() - start))
        returned = sum(getattr(o.outputs[0], "mm_embedding", None) is not None and
                       o.outputs[0].mm_embedding.nbytes for o in outputs)  # fmt: skip
    return {
        "requests_per_s": statistics.median(rates),
        "bytes_per_request": returned / num_requests,
        "rss_growth_mb": (rss_bytes() - rss_before) / 2**20,
    }


def profile_round(llm, batch, params) -> dict:
    """Function calls and vllm_omni's own share of the time for one batch (engine in-process)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(llm.generate, batch, params, use_tqdm=False)
    stats = pstats.Stats(profiler)
    own = sum(row[2] for key, row in stats.stats.items() if "vllm_omni" in key[0])
    return {"calls": stats.total_calls, "own_share": own / stats.total_tt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3, help="engine restarts per configuration")
    parser.add_argument("--model", default=None, help="default: the tiny LLaVA checkpoint")
    parser.add_argument("--profile", action="store_true", help="count calls instead of timing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = harness.parse_args(parser, requests=16, rounds=1, passes=1)
    if args.child:
        result = run_config(args.model, json.loads(args.child), args.requests, args.rounds)
        print("RESULT " + json.dumps(result))
        return

    from vllm_omni.testing.tiny_models import tiny_model_path

    model = args.model or tiny_model_path("llava")
    if args.profile:
        return report_profile(model, args)
    names = list(CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for p in range(args.passes):  # rotate the order: drift in machine load hits every config alike
        for name in names[p % len(names) :] + names[: p % len(names)]:
            runs[name].append(run_child(name, model, args))
            print(f"pass {p + 1} {name:5s}: {runs[name][-1]['requests_per_s']:8.2f} req/s", flush=True)
    rate = {name: statistics.median(r["requests_per_s"] for r in runs[name]) for name in names}
    for name in names:
        last = runs[name][-1]
        print(
            f"{name:5s}: median {rate[name]:8.2f} req/s, {last['bytes_per_request']:7.0f} embedding "
            f"bytes/request, peak RSS growth {max(r['rss_growth_mb'] for r in runs[name]):6.1f} MiB"
        )
    print(f"feature off vs stock vLLM: {rate['off'] / rate['stock']:.3f}x")
    print(f"feature on vs feature off: {rate['on'] / rate['off']:.3f}x")
    harness.config(f"tiny LLaVA, {args.requests} image requests x {args.rounds} rounds, {args.passes} fresh "
                   "engines per configuration, medians")  # fmt: skip
    harness.headline("requests/s, feature off / stock vLLM", rate["off"] / rate["stock"])
    harness.headline("requests/s, feature on / feature off", rate["on"] / rate["off"])


def report_profile(model: str, args) -> None:
    profile_env = {"OMNI_BENCH_PROFILE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = {name: run_child(name, model, args, profile_env) for name in CONFIGS}
    for name, row in result.items():
        print(f"{name:5s}: {row['calls']:9d} Python calls, vllm_omni own time {100 * row['own_share']:.2f}%")
    print(f"calls, feature off vs stock vLLM: {result['off']['calls'] / result['stock']['calls']:.4f}x")
    print(f"calls, feature on vs feature off: {result['on']['calls'] / result['off']['calls']:.4f}x")


def run_child(name: str, model: str, args, extra_env: dict | None = None) -> dict:
    env, engine_kwargs = CONFIGS[name]
    env = {**env, **(extra_env or {})}
    cmd = [sys.executable, __file__, "--model", model, "--requests", str(args.requests),
           "--rounds", str(args.rounds), "--child", json.dumps(engine_kwargs)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **env}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT ") :])


if __name__ == "__main__":
    main()
