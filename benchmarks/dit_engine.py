"""DiT engine vs diffusers, side by side in one run (tiny random checkpoints, CPU).

Prints ratios:
  single      latency of one request: our engine / diffusers pipeline (<= 1.05 is the goal)
  stream      16 requests arriving over time (one every INTERVAL x single-request latency; 0 = burst):
              throughput and mean latency of our engine vs diffusers sequential and hand-batched
  cond-cache  repeated prompts: uncached / cached engine time of the text-encoding set-up
  step-cache  first-block cache: speedup and PSNR (dB) against the uncached images
  compile     compiled blocks (DiTConfig.compile="on") beside diffusers' compile_repeated_blocks(): start-up
              and its warm-up, the first request after start, the transformer alone on one full step's
              inputs (ours vs diffusers compiled), then single (compiled vs compiled) and
              streams at intervals 0 and 1x with all six contenders: ours, diffusers sequential and
              hand-batched, each eager and compiled (--no-compile skips these)

Arrivals are on one virtual clock for all three contenders: time advances by each measured engine step or
pipeline call, and jumps to the next arrival when nothing is ready. Diffusers sequential starts a request
when it has arrived and the previous one is done; hand-batched starts a batch when its last request has
arrived. Each interval runs --repeats times (interleaved); the medians are printed.

Usage: python benchmarks/dit_engine.py [--quick] [--family sd3|z_image] [--size 64] [--steps 20]
       [--requests 16] [--intervals 0,0.25,1]
--quick: 32x32, 2 steps, 4 requests in batches of 2, intervals 0 and 1, one repeat (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import harness
import numpy as np
import torch

from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine


def params(args, seed: int) -> DiffusionSamplingParams:
    return DiffusionSamplingParams(
        height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance,
        seed=seed, output_type="np",
    )  # fmt: skip


_ids = itertools.count()


def drain(engine: DiffusionEngine, args, arrivals: list[tuple[float, int]]) -> dict:
    """Step until idle; ``arrivals``: (virtual time s, seed) pairs, sorted by time.

    Returns {seed: (output, virtual completion time)}; the clock advances by each step's measured time.
    """
    outputs, clock, pending = {}, 0.0, list(arrivals)
    while engine.has_unfinished_requests() or pending:
        if not engine.has_unfinished_requests():
            clock = max(clock, pending[0][0])
        while pending and pending[0][0] <= clock:
            _, seed = pending.pop(0)
            engine.add_request(f"{seed}#{next(_ids)}", f"prompt {seed}", params(args, seed))
        elapsed, finished = timed(engine.step)
        clock += elapsed
        outputs.update({int(o.request_id.split("#")[0]): (o, clock) for o in finished})
    return outputs


def serve_in_order(batches: list[list[int]], arrival: dict[int, float], run) -> dict[int, float]:
    """Virtual completion time per seed when ``run(batch)`` handles ``batches`` one after another."""
    done, clock = {}, 0.0
    for batch in batches:
        clock = max(clock, max(arrival[i] for i in batch)) + timed(lambda batch=batch: run(batch))[0]
        done.update(dict.fromkeys(batch, clock))
    return done


def stream(engine, pipe, args, interval: float) -> dict[str, tuple[float, float]]:
    """(throughput img/s, mean latency s) of each contender for requests every ``interval`` seconds."""
    n = args.requests
    arrival = {i: i * interval for i in range(n)}
    served = drain(engine, args, sorted((t, i) for i, t in arrival.items()))
    run = lambda batch: diffusers_call(pipe, args, [f"prompt {i}" for i in batch], batch)  # noqa: E731
    hand_batches = [list(range(j, min(j + args.batch, n))) for j in range(0, n, args.batch)]
    done = {
        "ours": {seed: t for seed, (_, t) in served.items()},
        "sequential": serve_in_order([[i] for i in range(n)], arrival, run),
        "hand-batched": serve_in_order(hand_batches, arrival, run),
    }
    return {
        name: (n / max(t.values()), float(np.mean([t[i] - arrival[i] for i in range(n)])))
        for name, t in done.items()
    }


def compare_single(engine: DiffusionEngine, pipe, args, label: str = "") -> float:
    """Print the single-request latency of ours vs diffusers (interleaved runs, new prompts: no
    conditioning-cache hit, medians); returns the least disturbed diffusers latency."""
    ours, theirs = [], []
    for seed in range(100, 100 + args.repeats * 3):
        ours.append(timed(lambda seed=seed: drain(engine, args, [(0, seed)]))[0])
        theirs.append(timed(lambda seed=seed: diffusers_call(pipe, args, [f"prompt {seed}"], [seed]))[0])
    ratio = np.median(ours) / np.median(theirs)
    print(f"single      {label}{' ' * bool(label)}diffusers {np.median(theirs):.3f}s  ours "
          f"{np.median(ours):.3f}s  ratio ours/diffusers {ratio:.3f}")  # fmt: skip
    goal = "<= 1.0" if label else "<= 1.05"
    harness.headline(f"single-request latency, ours / diffusers{' ' * bool(label)}{label}", ratio, goal)
    return float(np.min(theirs))


def compare_streams(engine: DiffusionEngine, pipe, args, unit: float) -> None:
    """Print throughput and mean latency of each contender for ``args.requests`` requests arriving every
    ``interval`` x ``unit`` seconds, per interval of ``args.intervals`` (one virtual clock, see above)."""
    for interval in args.intervals:
        runs = [stream(engine, pipe, args, interval * unit) for _ in range(args.repeats)]
        med = {k: [float(np.median([r[k][j] for r in runs])) for j in (0, 1)] for k in runs[0]}
        (ours_tp, ours_lat), (seq_tp, seq_lat), (bat_tp, bat_lat) = med.values()
        print(f"stream      interval {interval:g}x  img/s: ours {ours_tp:.2f}  sequential {seq_tp:.2f}  "
              f"hand-batched {bat_tp:.2f}  ours/better {ours_tp / max(seq_tp, bat_tp):.2f}  | latency s: "
              f"ours {ours_lat:.2f}  sequential {seq_lat:.2f}  hand-batched {bat_lat:.2f}")  # fmt: skip
        harness.headline(f"stream, interval {interval:g}x: throughput ours / better diffusers baseline",
                         ours_tp / max(seq_tp, bat_tp))  # fmt: skip


def timed(fn) -> tuple[float, object]:
    """Seconds ``fn`` took (CUDA work included: the device is synchronized before the clock stops)."""
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def diffusers_call(pipe, args, prompts: list[str], seeds: list[int]):
    return pipe(
        prompt=prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size,
        width=args.size, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
    ).images  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd3", choices=["sd3", "z_image"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="running batch bound and hand-batch size")
    parser.add_argument(
        "--intervals",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0, 0.25, 1],
        help="arrival intervals, in units of the diffusers single-request latency",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.1, help="first-block cache threshold")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contenders")
    args = harness.parse_args(parser, size=32, steps=2, requests=4, batch=2, intervals=[0, 1], repeats=1)
    torch.set_grad_enabled(False)
    import diffusers

    path = tiny_model_path(args.family)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    engine = DiffusionEngine(path, DiTConfig(max_batch_size=args.batch))
    print(f"family={args.family} size={args.size}x{args.size} steps={args.steps} guidance={args.guidance} "
          f"requests={args.requests} batch={args.batch} threads={torch.get_num_threads()}")  # fmt: skip
    harness.config(f"tiny {args.family}, {args.size}x{args.size}, {args.steps} steps, {args.requests} "
                   f"requests, batch {args.batch}, {args.repeats} repeats")  # fmt: skip

    diffusers_call(pipe, args, ["warm-up"], [0])
    drain(engine, args, [(0, 0)])

    unit = compare_single(engine, pipe, args)
    compare_streams(engine, pipe, args, unit)
    compare_conditioning_cache(engine, path, args)
    compare_step_cache(engine, path, args)
    if not args.no_compile:
        compare_compiled(engine, pipe, path, args)


def compare_conditioning_cache(engine: DiffusionEngine, path: str, args) -> None:
    """The same prompts again hit the cache: set-up time only (one step of new requests), uncached vs
    ``engine`` (which has seen prompts 0..requests-1)."""
    n = args.requests
    cold = DiffusionEngine(path, DiTConfig(max_batch_size=n, cache={"conditioning_cache_bytes": 0}))
    setup = {}
    for label, eng in (("off", cold), ("on", engine)):
        for i in range(n):
            eng.add_request(f"c{label}{i}", f"prompt {i}", params(args, i))
        plan = eng.scheduler.schedule()
        setup[label], _ = timed(lambda eng=eng, plan=plan: eng.runner.add_requests(plan.new_requests))
        eng.abort_request([f"c{label}{i}" for i in range(n)])
        while eng.has_unfinished_requests():  # reports the aborts (not drain: these ids name no seed)
            eng.step()
    stats = engine.runner.conditioning_cache.stats
    print(f"cond-cache  set-up of {n} requests: uncached {setup['off'] * 1e3:.1f} ms  cached "
          f"{setup['on'] * 1e3:.1f} ms  speedup {setup['off'] / setup['on']:.2f}  "
          f"hit rate {stats.hit_rate:.2f}")  # fmt: skip
    harness.headline("conditioning cache: set-up uncached / cached", setup["off"] / setup["on"])


def compare_step_cache(engine: DiffusionEngine, path: str, args) -> None:
    """The same batch with and without the first-block cache: speedup and the worst PSNR."""
    step_cache = {"step_cache": "first_block", "step_cache_threshold": args.threshold}
    fbc = DiffusionEngine(path, DiTConfig(max_batch_size=args.batch, cache=step_cache))
    drain(fbc, args, [(0, 0)])
    batch = [(0, i) for i in range(args.batch)]
    t_plain, plain = timed(lambda: drain(engine, args, batch))
    t_cached, cached = timed(lambda: drain(fbc, args, batch))
    worst = min(psnr(cached[k][0].images, plain[k][0].images) for k in plain)
    cache = fbc.runner.step_cache
    print(
        f"step-cache  threshold {args.threshold}  speedup {t_plain / t_cached:.2f}  "
        f"worst PSNR {worst:.1f} dB  rows skipped {cache.skipped}/{cache.skipped + cache.computed}"
    )
    harness.headline(f"first-block cache (threshold {args.threshold:g}): speedup", t_plain / t_cached)
    harness.headline(f"first-block cache (threshold {args.threshold:g}): worst PSNR, dB", worst)


def compare_compiled(engine: DiffusionEngine, pipe, path: str, args) -> None:
    """Compiled blocks: ours (``DiTConfig.compile="on"``) vs diffusers' ``compile_repeated_blocks()``, and
    the eager contenders (``engine``, ``pipe``) beside them: start-up (compile warm-up), the first request
    after start, single-request latency, streams (burst and 1x the compiled diffusers' latency)."""
    import diffusers

    config = DiTConfig(max_batch_size=args.batch, height=args.size, width=args.size)
    eager_start, _ = timed(lambda: DiffusionEngine(path, config))
    start, ours = timed(lambda: DiffusionEngine(path, dataclasses.replace(config, compile="on")))
    first, _ = timed(lambda: drain(ours, args, [(0, 0)]))
    theirs = diffusers.DiffusionPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    compile_repeated_blocks(theirs.transformer)
    their_first, _ = timed(lambda: diffusers_call(theirs, args, ["warm-up"], [0]))
    their_batch, _ = timed(lambda: diffusers_call(theirs, args, ["warm-up"] * args.batch, [0] * args.batch))
    print(f"compile     start: ours eager {eager_start:.1f}s  ours compiled {start:.1f}s (warm-up "
          f"{start - eager_start:.1f}s)  | first request after start: ours {first:.2f}s  diffusers compiled "
          f"{their_first:.2f}s (then {their_batch:.2f}s for its first batch of {args.batch})")  # fmt: skip
    harness.headline("compiled: warm-up at start, s (ours)", start - eager_start)
    harness.headline("compiled: first request after start, s (ours)", first)
    compare_forward(ours, theirs, args)
    unit = compare_single(ours, theirs, args, "compiled")
    for interval in (0, 1):
        runs = [stream(e, p, args, interval * unit) for _ in range(args.repeats) for e, p in
                ((ours, theirs), (engine, pipe))]  # fmt: skip
        tp = {**median_throughputs(runs[0::2], "compiled"), **median_throughputs(runs[1::2], "eager")}
        best = max(v for k, v in tp.items() if not k.startswith("ours"))
        print(f"compiled    interval {interval}x  img/s: " + "  ".join(f"{k} {v:.2f}" for k, v in tp.items())
              + f"  ours compiled/best diffusers {tp['ours compiled'] / best:.2f}")  # fmt: skip
        harness.headline(f"compiled stream, interval {interval}x: throughput ours compiled / best diffusers",
                         tp["ours compiled"] / best, ">= 1.2")  # fmt: skip


def compare_forward(engine: DiffusionEngine, pipe, args) -> None:
    """The two compiled transformers alone on the same inputs: those of one step of a full batch (``batch``
    requests, two rows each with guidance), captured from ``engine`` (interleaved forwards, medians)."""
    transformer = engine.runner.family.transformer
    call = {}
    hook = transformer.register_forward_pre_hook(
        lambda module, a, kw: call.update(args=a, kwargs=kw), with_kwargs=True
    )
    drain(engine, args, [(0, seed) for seed in range(args.batch)])  # a burst: every step has every row
    hook.remove()
    forwards = {"ours": transformer, "diffusers": pipe.transformer}
    times = {name: [] for name in forwards}
    with torch.inference_mode():
        for _ in range(1 + args.repeats * 3):  # the first round warms up (a new grad mode for diffusers)
            for name, forward in forwards.items():
                times[name].append(timed(lambda f=forward: f(*call["args"], **call["kwargs"]))[0])
    ours, theirs = (float(np.median(t[1:])) for t in times.values())
    rows = len(next(iter((*call["args"], *call["kwargs"].values()))))  # latents come first (SD3: by name)
    print(f"compiled    transformer forward, {rows} rows: ours {ours * 1e3:.1f} ms  diffusers "
          f"{theirs * 1e3:.1f} ms  ratio {ours / theirs:.3f}")  # fmt: skip
    harness.headline("compiled transformer forward, same inputs: ours / diffusers", ours / theirs)


def median_throughputs(runs: list[dict], mode: str) -> dict[str, float]:
    """Median img/s of each contender of ``stream`` runs, named '<contender> <mode>'."""
    return {f"{name} {mode}": float(np.median([r[name][0] for r in runs])) for name in runs[0]}


def compile_repeated_blocks(transformer) -> None:
    """diffusers' regional compile. SD3's transformer declares no ``_repeated_blocks`` in diffusers 0.42, so
    its block class (the one our engine compiles) is named for it."""
    if not transformer._repeated_blocks:
        transformer._repeated_blocks = [type(transformer.transformer_blocks[0]).__name__]
    transformer.compile_repeated_blocks()


if __name__ == "__main__":
    main()
