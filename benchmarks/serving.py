"""The omni server, measured side by side in one run: against offline inference and against stock vLLM.

1. images: the tiny SD3 (--size, --steps) behind ``vllm serve MODEL --omni``, --concurrency clients (16 and
   64) each sending its next ``/v1/images/generations`` request (n 1, a prompt and seed of its own) as
   soon as its last one is answered, against offline ``OmniLLM`` running the same number of requests in
   one ``generate`` call. That is the offline ceiling, the fairest bar for a server: the DiT stage gets the
   whole batch at once and nothing is encoded or sent (``AsyncOmniLLM`` at the same concurrency would
   only isolate HTTP and PNG encoding); the stage settings are the server's, so the batches are the same
   (at most 8). Throughput (images/s) and server / offline, goal >= 0.9x; p50/p99 request latency over
   HTTP; time to the first partial image of streamed requests (``stream``, ``partial_images`` 1), one at a
   time on the idle server. The server and ``OmniLLM`` are both up and take turns (idle, neither
   computes); each round runs the contenders in a rotated order, after one untimed round of each (warm-
   up: a first run of 128 over HTTP was 0.8x a later one). The HTTP clients run in this process.
2. text: the tiny Qwen3 behind ``vllm serve MODEL --omni`` (a pipeline of one ar stage) against stock
   ``vllm serve MODEL``, the same engine flags (ENGINE_FLAGS, VLLM_CPU_KVCACHE_SPACE=1), the load from vLLM's
   own ``vllm bench serve`` (random prompts of --input-len tokens, --output-len tokens each with
   --ignore-eos, at most --text-concurrency in flight: 1 and 16). The servers take turns: start one, bench
   it (one untimed run at each concurrency first: after vLLM's own --num-warmups, omni's first run at 16
   in flight was 0.74x the next), stop it, then the other; rounds alternate which goes first. Stock vLLM
   stalls for about 0.7 s in some runs at 16 in flight on 2 cores (p99 TTFT 650-770 ms), with or without
   the patch layer (docs/features/serving.md). Output tok/s, req/s, p50/p99 TTFT, p50
   TPOT, p50/p99 ITL; omni / stock, goal >= 0.97x for throughput. The tiny model computes almost nothing:
   this measures what each server spends per request and per token. A TPOT or ITL near 0 ms means the
   client read a request's tokens in one go (the server wrote them faster than the client read): no
   ratio is printed for stock values below 0.1 ms.
Numbers are medians over --rounds.

Usage: python benchmarks/serving.py [--quick] [--only images|text] [--rounds 3] [--image-requests 128]
       [--concurrency 16 64] [--size 64] [--steps 4] [--stream-requests 10] [--text-requests 256]
       [--text-concurrency 1 16] [--input-len 64] [--output-len 32]
--quick: one round; 8 images from 8 clients; 1 streamed; 16 text requests, 8 in flight. Every row in about
2 minutes (four server starts): a smoke run, its numbers are not the measurement. Run the full one on a
quiet machine: other processes on the 2 cores move every number.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import httpx

from vllm_omni.testing.server import ServerStartError, wait_healthy
from vllm_omni.testing.tiny_models import tiny_model_path

VLLM = str(Path(sys.executable).parent / "vllm")
ENGINE_FLAGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32"]
SERVER_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
START_TIMEOUT_SECONDS = 300
STOP_TIMEOUT_SECONDS = 60
LOG_TAIL_CHARS = 3000


# ---- servers ---------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """A server that did not start (its log's tail in the message), or a load run that failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve MODEL FLAGS`` on a free local port, in its own session (whatever it starts goes with
    it), its output in a file whose tail is in the error when it exits or is not healthy in time. Use it
    as a context manager (stopped on exit, whatever happened) and ``wait_healthy`` for its URL."""

    def __init__(self, model: str, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [VLLM, "serve", model, "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], *flags]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, env=SERVER_ENV, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info) -> None:
        stop(self.process)
        self.log.close()

    def wait_healthy(self) -> str:
        """The server's URL once ``/health`` answers 200 (ServerStartError if it exits or takes too long)."""
        wait_healthy(self.url, self.process, START_TIMEOUT_SECONDS, self.log)
        return self.url


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains and stops its engines), then SIGKILL to its whole session."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers: engine and stage processes
    except ProcessLookupError:
        pass
    process.wait()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# ---- 1. images -------------------------------------------------------------------------------------
def image_body(args, seed: int, **extra) -> dict:
    size = f"{args.size}x{args.size}"
    return {"prompt": f"a red sunset over the sea, number {seed}", "size": size,
            "num_inference_steps": args.steps, "seed": seed, **extra}  # fmt: skip


async def http_load(url: str, args, concurrency: int, first_seed: int) -> tuple[float, list[float]]:
    """REQUESTS image requests from ``concurrency`` clients; (wall seconds, per-request latencies)."""
    seeds = iter(range(first_seed, first_seed + args.image_requests))
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        for seed in seeds:  # one shared iterator: each client takes the next request
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/images/generations", json=image_body(args, seed))
            if response.status_code != 200 or len(response.json()["data"]) != 1:
                raise ServerError(f"an image request got {response.status_code}: {response.text[:500]}")
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


async def first_partial(url: str, args, seed: int) -> tuple[float, float]:
    """One streamed request (``partial_images`` 1): seconds to its first partial image, to its end."""
    body = image_body(args, seed, stream=True, partial_images=1)
    first = None
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        async with http.stream("POST", f"{url}/v1/images/generations", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise ServerError(f"a streamed image request got {response.status_code}: {response.text}")
            async for line in response.aiter_lines():
                if line == "event: image_generation.partial_image" and first is None:
                    first = time.perf_counter() - start
                if line == "event: image_generation.completed":
                    break
        done = time.perf_counter() - start
    if first is None:
        raise ServerError("a streamed request with partial_images 1 got no image_generation.partial_image")
    return first, done


def offline_run(omni, args, first_seed: int) -> float:
    seeds = range(first_seed, first_seed + args.image_requests)
    prompts = [{"prompt": image_body(args, seed)["prompt"]} for seed in seeds]
    params = [{"height": args.size, "width": args.size, "num_inference_steps": args.steps, "seed": seed}
              for seed in seeds]  # fmt: skip
    start = time.perf_counter()
    outputs = omni.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    failed = [o.error for o in outputs if o.error is not None]
    if failed:
        raise ServerError(f"offline: {len(failed)} requests failed, the first with {failed[0]}")
    return elapsed


def images(args) -> None:
    from vllm_omni import OmniLLM, create_dit_stage_config

    sd3 = tiny_model_path("sd3")
    flags = ["--omni", "--dit-steps", str(args.steps), "--dit-size", f"{args.size}x{args.size}"]
    with Server(sd3, *flags) as server:  # starts while OmniLLM starts
        omni = OmniLLM([create_dit_stage_config(0, sd3, num_inference_steps=args.steps, height=args.size,
                                                width=args.size)])  # fmt: skip
        try:
            url = server.wait_healthy()
            results = image_rounds(omni, url, args)
        finally:
            omni.close()
        ttfp = [asyncio.run(first_partial(url, args, 10**9 + i)) for i in range(args.stream_requests)]
    report_images(args, results, ttfp)


def image_rounds(omni, url: str, args) -> dict:
    """Throughputs and latencies of each contender per round (warm-ups first). Every request has a prompt
    of its own (its seed is in it): no contender finds another's prompts in the conditioning cache."""
    first_seeds = itertools.count(0, args.image_requests)
    contenders = ["offline", *args.concurrency]
    for contender in contenders:  # warm-up: each engine sees every batch size its contender makes
        run_images(omni, url, args, contender, next(first_seeds))
    asyncio.run(first_partial(url, args, next(first_seeds)))
    results: dict = {c: {"throughput": [], "latencies": []} for c in contenders}
    for round_index in range(args.rounds):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            elapsed, latencies = run_images(omni, url, args, contender, next(first_seeds))
            results[contender]["throughput"].append(args.image_requests / elapsed)
            if latencies is not None:
                results[contender]["latencies"].append(latencies)
    return results


def run_images(omni, url: str, args, contender: str | int, first_seed: int) -> tuple[float, list | None]:
    """One run of ``contender`` ("offline", or a number of HTTP clients): (seconds, HTTP latencies)."""
    if contender == "offline":
        return offline_run(omni, args, first_seed), None
    return asyncio.run(http_load(url, args, contender, first_seed))


def report_images(args, results: dict, ttfp: list[tuple[float, float]]) -> None:
    offline = statistics.median(results["offline"]["throughput"])
    print(f"images: tiny SD3 {args.size}x{args.size}, {args.steps} steps, {args.image_requests} requests "
          f"(median of {args.rounds}):")  # fmt: skip
    print(f"  offline OmniLLM, one generate call   {offline:7.2f} images/s")
    for concurrency in args.concurrency:
        entry = results[concurrency]
        rate = statistics.median(entry["throughput"])
        p50 = statistics.median(percentile(lat, 0.5) for lat in entry["latencies"])
        p99 = statistics.median(percentile(lat, 0.99) for lat in entry["latencies"])
        print(f"  HTTP, {concurrency:3d} concurrent clients       {rate:7.2f} images/s = "
              f"{rate / offline:.3f}x offline (goal >= 0.9); latency p50 {p50 * 1e3:.0f} ms, "
              f"p99 {p99 * 1e3:.0f} ms")  # fmt: skip
        measure = f"images/s, HTTP with {concurrency} clients / offline OmniLLM"
        harness.headline(measure, rate / offline, ">= 0.9")
    first = statistics.median(t for t, _ in ttfp)
    done = statistics.median(d for _, d in ttfp)
    print(f"  streamed (partial_images 1), one at a time: first partial image {first * 1e3:.0f} ms, "
          f"completed {done * 1e3:.0f} ms (median of {len(ttfp)})")  # fmt: skip
    harness.headline("streamed image, one at a time: first partial image, ms", first * 1e3)


# ---- 2. text ---------------------------------------------------------------------------------------
TEXT_ROWS = (  # (label, key in vllm bench serve's saved result)
    ("output tok/s", "output_throughput"),
    ("req/s", "request_throughput"),
    ("p50 TTFT ms", "p50_ttft_ms"),
    ("p99 TTFT ms", "p99_ttft_ms"),
    ("p50 TPOT ms", "p50_tpot_ms"),
    ("p50 ITL ms", "p50_itl_ms"),
    ("p99 ITL ms", "p99_itl_ms"),
)
TEXT_NOTES = {"output_throughput": "(goal >= 0.97)", "request_throughput": ""}
"""After the ratio; latency rows: "(lower is better)"."""
MIN_STOCK_VALUE = 0.1
"""No ratio below this (ms): the client read the tokens together, the gaps between them are no latency."""


def bench_serve(url: str, model: str, args, concurrency: int, result: Path) -> dict:
    """``vllm bench serve`` against ``url`` with at most ``concurrency`` requests in flight; its result."""
    port = url.rsplit(":", 1)[1]
    command = [VLLM, "bench", "serve", "--backend", "vllm", "--endpoint", "/v1/completions",
               "--host", "127.0.0.1", "--port", port, "--model", model, "--tokenizer", model,
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(args.text_requests),
               "--max-concurrency", str(concurrency), "--num-warmups", str(concurrency), "--ignore-eos",
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
               "--disable-tqdm", "--seed", "0", "--save-result", "--result-dir", str(result.parent),
               "--result-filename", result.name]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0 or not result.exists():
        output = (run.stdout + run.stderr)[-LOG_TAIL_CHARS:]
        raise ServerError(f"vllm bench serve exited with {run.returncode}; its output ends:\n{output}")
    saved = json.loads(result.read_text())
    if saved["failed"]:
        raise ServerError(f"vllm bench serve: {saved['failed']} of {saved['num_prompts']} requests failed")
    return saved


def text(args) -> None:
    qwen3 = tiny_model_path("qwen3")
    servers = {"stock": ENGINE_FLAGS, "omni": ["--omni", *ENGINE_FLAGS]}
    results: dict = {(name, c): [] for name in servers for c in args.text_concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(servers)[::-1]
            for name in order:
                with Server(qwen3, *servers[name]) as server:
                    url = server.wait_healthy()
                    for concurrency in args.text_concurrency:  # warm-up: one untimed run of each
                        bench_serve(url, qwen3, args, concurrency, Path(tmp) / f"warm-up-{concurrency}.json")
                    for concurrency in args.text_concurrency:
                        result = Path(tmp) / f"{name}-{concurrency}-{round_index}.json"
                        results[name, concurrency].append(bench_serve(url, qwen3, args, concurrency, result))
    for concurrency in args.text_concurrency:
        report_text(args, concurrency, results[("stock", concurrency)], results[("omni", concurrency)])


def report_text(args, concurrency: int, stock_runs: list[dict], omni_runs: list[dict]) -> None:
    print(f"text: tiny Qwen3, {args.text_requests} requests of {args.input_len} prompt + {args.output_len} "
          f"generated tokens, at most {concurrency} in flight, vllm bench serve "
          f"(median of {args.rounds}):")  # fmt: skip
    print(f"  {'':14s} {'stock':>9s} {'omni':>9s}  omni/stock")
    for label, key in TEXT_ROWS:
        stock = statistics.median(run[key] for run in stock_runs)
        omni = statistics.median(run[key] for run in omni_runs)
        note = TEXT_NOTES.get(key, "(lower is better)")
        ratio = f"{omni / stock:7.3f}x" if stock >= MIN_STOCK_VALUE else "    n/a "
        print(f"  {label:14s} {stock:9.2f} {omni:9.2f}  {ratio} {note}".rstrip())
    stock, omni = (
        statistics.median(run["output_throughput"] for run in runs) for runs in (stock_runs, omni_runs)
    )
    harness.headline(
        f"text, {concurrency} in flight: output tok/s, omni / stock vllm serve", omni / stock, ">= 0.97"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("images", "text"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="images: clients")
    parser.add_argument("--size", type=int, default=64, help="images: width and height")
    parser.add_argument("--steps", type=int, default=4, help="images: denoising steps")
    parser.add_argument("--stream-requests", type=int, default=10, help="images: streamed requests")
    parser.add_argument("--text-requests", type=int, default=256)
    parser.add_argument(
        "--text-concurrency",
        type=int,
        nargs="+",
        default=[1, 16],
        help="text: requests in flight (vllm bench serve --max-concurrency)",
    )
    parser.add_argument("--input-len", type=int, default=64, help="text: prompt tokens")
    parser.add_argument("--output-len", type=int, default=32, help="text: generated tokens")
    args = harness.parse_args(parser, rounds=1, image_requests=8, concurrency=[8], stream_requests=1,
                              text_requests=16, text_concurrency=[8])  # fmt: skip
    harness.config(
        f"tiny SD3 {args.size}x{args.size}, {args.steps} steps, {args.image_requests} image requests from "
        f"{args.concurrency} clients; tiny Qwen3, {args.text_requests} text requests of {args.input_len} + "
        f"{args.output_len} tokens, {args.text_concurrency} in flight; median of {args.rounds}"
    )
    try:
        if args.only in (None, "images"):
            images(args)
        if args.only in (None, "text"):
            text(args)
    except (ServerError, ServerStartError) as error:
        sys.exit(f"benchmarks/serving.py: {error}")


if __name__ == "__main__":
    main()
