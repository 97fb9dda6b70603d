"""Scaling a pipeline out, measured side by side in one run.

replicas: a DiT-bound pipeline (one tiny SD3 stage at --size px, --steps steps) serving --requests requests
(a seed each) in one ``OmniLLM.generate`` call: 2 replicas with a core each (``cpus: ["0", "1"]``) against
1 replica on one core (``cpus: "0"``), goal >= 1.7x images/s; and, for reference, 1 replica on both cores
(two OpenMP threads: what the machine gives one engine without replicas). All pipelines are up at once and
idle between turns; each round runs them in a rotated order. Numbers are medians over --rounds.

ray: the "2 replicas, 1 core each" pipeline with the Ray launcher (a local Ray instance) against local
processes, rotated rounds, goal >= 0.9x images/s; and the hand-off of a 4 MiB and a 64 MiB tensor between
two echo stages (made in one, read whole in the next, through the manager): Ray's object store against
shared memory, medians of --handoffs hand-offs one at a time. Skipped (said so) without Ray.

Usage: python benchmarks/scale_out.py [--quick] [--rounds 3] [--requests 32] [--size 64] [--steps 8]
       [--handoffs 20]
--quick: one round of 4 requests at 2 steps, 3 hand-offs (a smoke run; its numbers are not the measurement).
Run the full one on a quiet machine: other processes on the 2 cores move every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import harness

import vllm_omni.testing.echo_stage  # noqa: F401  (registers the echo kind)
from vllm_omni import OmniLLM, OmniStageConfig, create_dit_stage_config
from vllm_omni.testing.tiny_models import tiny_model_path

CONTENDERS = {  # name -> (replicas, cpus)
    "1 replica, 1 core": (1, "0"),
    "2 replicas, 1 core each": (2, ["0", "1"]),
    "1 replica, 2 cores": (1, "0,1"),
}


def images_per_second(omni: OmniLLM, args, first_seed: int) -> float:
    seeds = range(first_seed, first_seed + args.requests)
    prompts = [f"a lighthouse at night, number {seed}" for seed in seeds]
    start = time.perf_counter()
    outputs = omni.generate(prompts, [{"seed": seed} for seed in seeds], use_tqdm=False)
    elapsed = time.perf_counter() - start
    failed = [o.error for o in outputs if o.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first with {failed[0]}")
    return args.requests / elapsed


def replicas(args) -> None:
    dit = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
    sd3 = tiny_model_path("sd3")
    pipelines = {
        name: OmniLLM([create_dit_stage_config(0, sd3, replicas=count, cpus=cpus, **dit)])
        for name, (count, cpus) in CONTENDERS.items()
    }
    rates = rotated_rates(args, pipelines)
    base = rates["1 replica, 1 core"]
    print(f"replicas: tiny SD3 {args.size}x{args.size}, {args.steps} steps, {args.requests} requests, "
          f"one generate call (median of {args.rounds}):")  # fmt: skip
    for name, rate in rates.items():
        goal = " (goal >= 1.7)" if name == "2 replicas, 1 core each" else ""
        print(f"  {name:26s} {rate:7.2f} images/s = {rate / base:.2f}x 1 replica on 1 core{goal}")
    harness.config(f"tiny SD3 {args.size}x{args.size}, {args.steps} steps, {args.requests} requests, "
                   f"median of {args.rounds} rotated rounds")  # fmt: skip
    harness.headline("images/s, 2 replicas on a core each / 1 replica on 1 core",
                     rates["2 replicas, 1 core each"] / base, ">= 1.7x")  # fmt: skip
    harness.headline(
        "images/s, 1 replica on 2 cores / 1 replica on 1 core", rates["1 replica, 2 cores"] / base
    )


def rotated_rates(args, pipelines: dict[str, OmniLLM]) -> dict[str, float]:
    """Images/s of each pipeline (all up at once, run in a rotated order each round; medians); closes them."""
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    try:
        for omni in pipelines.values():  # warm-up: first steps allocate, first prompts fill nothing yet
            images_per_second(omni, argparse.Namespace(requests=2), 10**9)
        names = list(pipelines)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                rates[name].append(images_per_second(pipelines[name], args, round_index * args.requests))
    finally:
        for omni in pipelines.values():
            omni.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def ray_launcher(args) -> None:
    if importlib.util.find_spec("ray") is None:
        print("ray: not installed (pip install vllm-omni[ray]): skipped")
        return
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical CPUs: every actor fits
    try:
        dit = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
        stage = create_dit_stage_config(0, tiny_model_path("sd3"), replicas=2, cpus=["0", "1"], **dit)
        rates = rotated_rates(args, {name: OmniLLM([stage], launcher=name) for name in ("local", "ray")})
        print(f"ray: 2 tiny SD3 replicas on a core each, {args.requests} requests (median of {args.rounds}):")
        print(f"  local processes {rates['local']:7.2f} images/s; Ray actors {rates['ray']:7.2f} images/s = "
              f"{rates['ray'] / rates['local']:.2f}x (goal >= 0.9)")  # fmt: skip
        harness.headline("images/s, Ray actors / local processes", rates["ray"] / rates["local"], ">= 0.9x")
        for mib in (4, 64):
            seconds = {name: handoff_seconds(name, mib, args.handoffs) for name in ("local", "ray")}
            print(f"  hand-off of {mib} MiB: shared memory {seconds['local'] * 1e3:6.1f} ms, object store "
                  f"{seconds['ray'] * 1e3:6.1f} ms (median of {args.handoffs})")  # fmt: skip
            harness.headline(
                f"hand-off of {mib} MiB, object store / shared memory", seconds["ray"] / seconds["local"]
            )
    finally:
        ray.shutdown()


def handoff_seconds(launcher: str, mib: int, count: int) -> float:
    """Median time from a tensor made in one echo stage until the next one has read it whole."""
    stages = [OmniStageConfig(i, "echo", "none", ["latent"], stage_input="echo_tensor" if i else None)
              for i in (0, 1)]  # fmt: skip
    omni = OmniLLM(stages, launcher=launcher)
    try:
        omni.generate({"nbytes": 1 << 20}, use_tqdm=False)  # warm-up
        times = [omni.generate({"nbytes": mib << 20}, use_tqdm=False)[0].stage_outputs[1].handoff_seconds
                 for _ in range(count)]  # fmt: skip
    finally:
        omni.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--handoffs", type=int, default=20)
    args = harness.parse_args(parser, rounds=1, requests=4, steps=2, handoffs=3)
    replicas(args)
    ray_launcher(args)


if __name__ == "__main__":
    main()
