"""The DiT engine on a CUDA GPU: parity with diffusers and speed against it, in one run.

Needs torch, diffusers and transformers, not vLLM (the DiT engine imports without it). Prints:
  parity     each native family (sd3, z_image: the tiny random checkpoints), float32 and bfloat16: the
             largest pixel difference (0..1) of our images from diffusers' for the same seeds; with
             compiled blocks (DiTConfig.compile="on") too, in float32
  single     one request: our latency / diffusers' (median of 3 interleaved runs each)
  stream     --requests requests at once (interval 0) and arriving every half a single-request latency:
             throughput and mean latency, ours vs diffusers sequential and hand-batched (--batch a call)
  memory     the running batch's measured peak working memory vs the estimate a shared GPU reserves
             (vllm_omni/diffusion/memory.py)
for an SD3-medium-shaped DiT with random weights (24 layers of 24 heads x 64, patch 2, its 8x VAE with
128..512 channels; text encoders from the tiny SD3, which only changes the prompt's 333 tokens' width) at
1024x1024, 28 steps, bfloat16, per attention backend: ``sdpa``, and ``xformers`` when installed, and per
``--compile`` mode: ``off`` (eager, ours and diffusers) and ``on`` (ours compiled, diffusers with
``compile_repeated_blocks()``; the compile warm-up happens before the timed runs).

Budget on one H200: under 8 minutes without compile (tiny builds and parity ~1, the random DiT ~1, each
backend ~2-3); compile on adds its warm-ups and a second speed run per backend (not yet run on a GPU: give it
10 minutes, or pass --compile off).
Without a GPU it says so and exits 0; ``--cpu-smoke`` runs the same code paths on CPU at toy sizes.
``--cpu-smoke`` compiles nothing unless ``--compile`` says so (inductor's C++ warm-up: minutes on 2 cores).
``--quick``: 2 requests in a batch of 2, 1 step, 32x32 (seconds on a GPU; with ``--cpu-smoke``, about 10 s on
2 CPU cores: what CI runs).

Usage (from the repository root; see docs/installation.md, "Checking the DiT engine on a GPU"):
  PYTHONPATH=. python benchmarks/gpu/dit_gpu_check.py [--requests 8] [--steps 28] [--size 1024]
  PYTHONPATH=. python benchmarks/gpu/dit_gpu_check.py --cpu-smoke [--quick]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import harness  # noqa: E402
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel  # noqa: E402
from dit_engine import (  # noqa: E402
    compare_single,
    compare_streams,
    compile_repeated_blocks,
    diffusers_call,
    drain,
    timed,
)

from vllm_omni.config.dit import DiTConfig  # noqa: E402
from vllm_omni.diffusion.memory import GIB, DiTMemoryEstimate  # noqa: E402
from vllm_omni.testing.tiny_models import tiny_model_path  # noqa: E402
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine  # noqa: E402

SD3_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64,
              "caption_projection_dim": 1536, "sample_size": 128, "pos_embed_max_size": 192}  # fmt: skip
"""SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)."""
SD3_MEDIUM_VAE = {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}
TOY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "caption_projection_dim": 64,
       "sample_size": 32, "pos_embed_max_size": 32}  # fmt: skip
TOY_VAE = {"block_out_channels": [16, 32], "norm_num_groups": 8}
PARITY_LIMITS = {"float32": 1e-3, "bfloat16": 5e-2}
"""Largest pixel difference called a match: float32 as the CPU tests; bfloat16 rounds every layer."""


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"no GPU: torch {torch.__version__} sees no CUDA device, nothing to check here. Run this on a "
              "CUDA machine, or with --cpu-smoke to try its code paths on CPU at toy sizes.")  # fmt: skip
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    print(f"device {describe(device)}  torch {torch.__version__}  python {sys.version.split()[0]}")
    for family in ("sd3", "z_image"):
        for dtype in ("float32", "bfloat16"):
            check_parity(family, dtype, device, "off")
        if "on" in args.compile:
            check_parity(family, "float32", device, "on")
    with tempfile.TemporaryDirectory() as folder:
        build_shaped_sd3(Path(folder), TOY if args.cpu_smoke else SD3_MEDIUM, TOY_VAE if args.cpu_smoke
                         else SD3_MEDIUM_VAE, device)  # fmt: skip
        size = "toy" if args.cpu_smoke else "full"
        print(f"speed       SD3-medium-shaped random DiT ({size} size) "
              f"{args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, bfloat16, "
              f"{args.requests} requests, batch {args.batch}")  # fmt: skip
        names = backends(device)
        harness.config(
            f"{describe(device)}; SD3-medium-shaped random DiT ({size} size) {args.size}x{args.size}, "
            f"{args.steps} steps, bfloat16, {args.requests} requests, batch {args.batch}, backends {names}"
        )
        for backend in names:
            for mode in args.compile:
                compare_speed(folder, backend, mode, args, device)
    print(f"done in {time.perf_counter() - started:.0f}s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (tests the script)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024; toy: 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; toy: 2)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="running batch bound and hand-batch size")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument(
        "--compile",
        type=lambda v: v.split(","),
        default=None,
        help="DiTConfig.compile modes to run, of off,on (default off,on; --cpu-smoke: off)",
    )
    args = harness.parse_args(parser, requests=2, batch=2, steps=1, size=32)
    args.size = args.size or (64 if args.cpu_smoke else 1024)
    args.steps = args.steps or (2 if args.cpu_smoke else 28)
    args.compile = args.compile or (["off"] if args.cpu_smoke else ["off", "on"])
    args.intervals, args.repeats = [0, 0.5], 1  # what benchmarks/dit_engine.py's comparisons read
    return args


def describe(device: str) -> str:
    if device == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    properties = torch.cuda.get_device_properties(0)
    return f"{properties.name} ({properties.total_memory / GIB:.1f} GiB)"


def check_parity(family: str, dtype: str, device: str, compile: str) -> None:
    """Two requests (32x32, 4 steps, guided; one at a time: compiled, buckets 1 and 2) through our engine
    (``DiTConfig.compile``) and diffusers: the worst difference."""
    path = tiny_model_path(family)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    config = DiTConfig(dtype=dtype, device=device, max_batch_size=1, height=32, width=32, compile=compile)
    engine = DiffusionEngine(path, config)
    args = argparse.Namespace(size=32, steps=4, guidance=4.0)
    worst = 0.0
    for seed in (1, 2):
        ours = drain(engine, args, [(0, seed)])[seed][0].images
        theirs = diffusers_call(pipe, args, [f"prompt {seed}"], [seed])
        worst = max(worst, float(np.abs(ours.astype(np.float32) - theirs.astype(np.float32)).max()))
    verdict = "ok" if worst <= PARITY_LIMITS[dtype] else f"OVER {PARITY_LIMITS[dtype]:g}"
    label = f"{dtype} compile {compile}"
    print(f"parity      {family:8s} {label:21s} max |ours - diffusers| {worst:.2e}  {verdict}")
    harness.headline(f"parity {family} {label}: max pixel difference", worst, f"<= {PARITY_LIMITS[dtype]:g}")
    del pipe, engine
    release()


def build_shaped_sd3(out: Path, transformer_shape: dict, vae_shape: dict, device: str) -> None:
    """An SD3 pipeline folder: a random transformer and VAE of the given shapes (built on ``device``, saved
    in bfloat16), the tiny SD3's text encoders, tokenizers and scheduler."""
    tiny = DiffusionPipeline.from_pretrained(tiny_model_path("sd3"))
    text = tiny.transformer.config
    blocks = len(vae_shape["block_out_channels"])
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=text.joint_attention_dim,
            pooled_projection_dim=text.pooled_projection_dim, **transformer_shape,
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
            **vae_shape,
        )  # fmt: skip
    components = {**tiny.components, "transformer": transformer.to(torch.bfloat16), "vae": vae}
    type(tiny)(**components).save_pretrained(out)
    del tiny, components, transformer, vae
    release()


def backends(device: str) -> list[str]:
    if device == "cuda" and importlib.util.find_spec("xformers") is not None:
        return ["sdpa", "xformers"]
    print(f"            attention backend xformers skipped: {'not installed' if device == 'cuda' else 'CPU'}")
    return ["sdpa"]


def compare_speed(folder: str, backend: str, compile: str, args: argparse.Namespace, device: str) -> None:
    """Latency and throughput of our engine vs diffusers (benchmarks/dit_engine.py's comparisons), then the
    running batch's memory, for one attention backend, both eager or both compiled (``compile``)."""
    print(f"backend     {backend}, compile {compile}")
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    if backend == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if compile == "on":
        compile_repeated_blocks(pipe.transformer)
    config = DiTConfig(dtype="bfloat16", device=device, max_batch_size=args.batch, attention_backend=backend,
                       height=args.size, width=args.size, compile=compile)  # fmt: skip
    started = time.perf_counter()
    engine = DiffusionEngine(folder, config)
    start = time.perf_counter() - started
    first = timed(partial(drain, engine, args, [(0, 0)]))[0]
    warm_up = timed(partial(diffusers_call, pipe, args, ["warm-up"], [0]))[0]
    warm_up += timed(partial(diffusers_call, pipe, args, ["warm-up"] * args.batch, [0] * args.batch))[0]
    print(f"start       ours {start:.1f}s (compile warm-up included), its first request {first:.2f}s  "
          f"diffusers' first two calls (1 and {args.batch} prompts) {warm_up:.1f}s")  # fmt: skip
    compare_streams(engine, pipe, args, compare_single(engine, pipe, args, "compiled" * (compile == "on")))
    del pipe
    release()
    compare_memory(engine, folder, config, args)
    del engine
    release()


def compare_memory(engine: DiffusionEngine, folder: str, config: DiTConfig, args: argparse.Namespace) -> None:
    """A full running batch: its peak working memory (CUDA's peak minus what was allocated before) against
    the estimate (``DiTMemoryEstimate.request_bytes`` x the batch)."""
    estimate = DiTMemoryEstimate.from_folder(folder, config).request_bytes(args.size, args.size) * args.batch
    if config.device != "cuda":
        print(f"memory      estimated {estimate / GIB:.3f} GiB for the batch (measured on CUDA only)")
        return
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    drain(engine, args, [(0, seed) for seed in range(1000, 1000 + args.batch)])
    peak = torch.cuda.max_memory_allocated() - before
    print(f"memory      batch of {args.batch} at {args.size}px: peak working {peak / GIB:.2f} GiB, estimated "
          f"{estimate / GIB:.2f} GiB (measured/estimated {peak / estimate:.2f})")  # fmt: skip
    measure = f"{config.attention_backend}: batch peak memory, measured / estimated"
    harness.headline(measure, peak / estimate, "<= 1")


def release() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
