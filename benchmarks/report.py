"""Every benchmark in one list: run them all quickly (CI), or fully and write docs/benchmarks.md.

    python benchmarks/report.py --quick            # each --quick in turn, a crash fails (make bench-quick)
    python benchmarks/report.py [--only NAME ...]  # full runs -> results.json -> docs/benchmarks.md
    python benchmarks/report.py --write            # docs/benchmarks.md from results.json, nothing run

A benchmark's headline numbers are the ``bench-result`` lines it prints (benchmarks/harness.py). A quick run
checks that each benchmark exits 0 and prints at least one; its numbers are smoke, never recorded. A full run
records each benchmark's numbers with the date as soon as it finishes; one that prints none (the GPU check
without a GPU) keeps its previous entry. Entries not made by this script name their source.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its script (in benchmarks/), what it measures, its arguments in both runs."""

    name: str
    script: str
    what: str
    args: tuple[str, ...] = ()
    """Both runs'."""
    quick_args: tuple[str, ...] | None = ("--quick",)
    """The quick run's, after ``args``; None: no quick run of its own (another entry's runs the same)."""


BENCHMARKS = (
    Benchmark("startup_hook", "startup_hook.py", "start-up cost of the patch layer's .pth hook"),
    Benchmark("dit_engine_sd3", "dit_engine.py", "DiT engine vs diffusers: latency, streams, caches",
              ("--family", "sd3")),
    Benchmark("dit_engine_z_image", "dit_engine.py", "the same for Z-Image", ("--family", "z_image")),
    Benchmark("dit_engine_sd3_128", "dit_engine.py", "DiT engine vs diffusers at 128 px (SD3)",
              ("--family", "sd3", "--size", "128"), quick_args=None),
    Benchmark("dit_engine_z_image_128", "dit_engine.py", "DiT engine vs diffusers at 128 px (Z-Image)",
              ("--family", "z_image", "--size", "128"), quick_args=None),
    Benchmark("dit_gpu_check", "gpu/dit_gpu_check.py",
              "DiT engine on a CUDA GPU: parity, speed, memory (quick: its CPU smoke run)",
              quick_args=("--quick", "--cpu-smoke")),
    Benchmark("mm_embedding_throughput", "mm_embedding_throughput.py",
              "cost of the patch layer and of multimodal-embedding return vs stock vLLM"),
    Benchmark("multimodal_qwen3_throughput", "multimodal_qwen3_throughput.py",
              "multimodal Qwen3 vs plain Qwen3 on prompts of the same length"),
    Benchmark("omni_pipeline", "omni_pipeline.py",
              "omni pipelines: pipelining, hand-off overhead, AR stage cost"),
    Benchmark("serving", "serving.py", "vllm serve --omni vs offline OmniLLM and stock vllm serve"),
    Benchmark("omni_speech", "omni_speech.py",
              "Qwen2.5-Omni speech under load vs transformers' generate: throughput, RTF, first audio"),
    Benchmark("scale_out", "scale_out.py", "stage replicas, the Ray launcher, object-store hand-offs"),
)  # fmt: skip


def run(benchmark: Benchmark, quick: bool) -> tuple[int, str, float]:
    """Run one benchmark, its output passed through as it comes; (exit status, stdout, seconds)."""
    script = f"benchmarks/{benchmark.script}"
    command = [sys.executable, script, *benchmark.args, *(benchmark.quick_args if quick else ())]
    print(f"==> {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return process.wait(), "".join(lines), time.perf_counter() - start


def run_quick(benchmarks: list[Benchmark]) -> None:
    """Each benchmark's quick run in turn; exits 1 at the first that fails or prints no headline."""
    seconds = {}
    for benchmark in (b for b in benchmarks if b.quick_args is not None):
        status, output, seconds[benchmark.name] = run(benchmark, quick=True)
        if status != 0 or not harness.read_results(output)[1]:
            why = f"exited with {status}" if status else "printed no headline (bench-result line)"
            sys.exit(f"benchmarks/report.py: {benchmark.name} --quick {why}")
    print("quick runs: " + ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items()) +
          f"; total {sum(seconds.values()):.0f}s")  # fmt: skip


def run_full(benchmarks: list[Benchmark]) -> None:
    """Each benchmark's full run; its numbers recorded (and the doc rewritten) as soon as it finishes."""
    for benchmark in benchmarks:
        status, output, seconds = run(benchmark, quick=False)
        if status != 0:
            sys.exit(f"benchmarks/report.py: {benchmark.name} exited with {status}")
        config, headlines = harness.read_results(output)
        if not headlines:
            print(f"==> {benchmark.name} printed no headline: its entry is kept")
            continue
        results = load_results()
        today = datetime.date.today().isoformat()
        results[benchmark.name] = {"date": today, "source": "benchmarks/report.py", "seconds": round(seconds),
                                   "config": config, "headlines": headlines}  # fmt: skip
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_doc()


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


GOAL = re.compile(r"(<=|>=|<|>)\s*([0-9.]+)")
COMPARE = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}


def met(value: float, goal: str) -> str:
    """'yes' / 'no' for a goal such as '>= 0.9' or '< 2%'; empty when there is none."""
    match = GOAL.match(goal)
    return "" if not match else ("yes" if COMPARE[match[1]](float(value), float(match[2])) else "**no**")


def write_doc() -> None:
    """docs/benchmarks.md: one row per headline number, grouped by benchmark, in BENCHMARKS' order."""
    results = load_results()
    rows = ["| benchmark | what | configuration | measure | value | goal | met | date, source |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for benchmark in BENCHMARKS:
        entry = results.get(benchmark.name)
        if entry is None:
            rows.append(f"| {benchmark.name} | {benchmark.what} | | not measured yet | | | | |")
            continue
        when = f"{entry['date']}, {entry['source']}"
        for i, line in enumerate(entry["headlines"]):
            head = f"{benchmark.name} | {benchmark.what} | {entry['config']}" if i == 0 else " | | "
            rows.append(f"| {head} | {line['measure']} | {line['value']:.4g} | {line['goal']} | "
                        f"{met(line['value'], line['goal'])} | {when if i == 0 else ''} |")  # fmt: skip
    DOC.write_text(DOC_HEAD + "\n".join(rows) + "\n")


DOC_HEAD = """# Benchmarks

The latest full run of every benchmark in `benchmarks/`, written by `make benchmarks-doc`
(`python benchmarks/report.py`: runs each in full, one after another, records its numbers in
`benchmarks/results.json`, then rewrites this page; `--only NAME ...` reruns some, `--write` only rewrites
the page). Do not edit it by hand. CI runs every benchmark in quick mode (`make bench-quick`: a crash fails,
the numbers are printed, not checked). Each script's docstring says what it measures and how; the
features' pages (docs/features/) explain the numbers. All runs on the 2-core CPU machine unless the
configuration says otherwise; other processes on it move every number, so the full runs belong on a quiet one.
A source other than `benchmarks/report.py` is a number taken from that page, not yet rerun by the report.

"""


def main() -> None:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick (nothing recorded)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"some of: {names}")
    parser.add_argument("--write", action="store_true", help="only rewrite docs/benchmarks.md")
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if args.only is None or b.name in args.only]
    if args.write:
        write_doc()
    elif args.quick:
        run_quick(chosen)
    else:
        run_full(chosen)


if __name__ == "__main__":
    main()
