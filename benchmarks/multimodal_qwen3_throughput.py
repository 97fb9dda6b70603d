"""Multimodal Qwen3 vs plain Qwen3 throughput on prompts of the same total length (one run, side by side).

Both engines hold the same random LM (the multimodal folder is built from the plain one): by default a
small Qwen3 (hidden 512, 4 layers, built in a temp folder), or the 2-layer hidden-64 test checkpoint with
--hidden 64 --layers 2, where the fixed per-request cost of vLLM's multimodal input processing
(parsing, hashing, sending the tensors: ~2.5 ms for 4 items here) outweighs the tiny LM's compute.
Each multimodal prompt is TEXT text tokens plus ITEMS items of ROWS positions (audio and vision
alternating, all different so no prefix is shared); each plain prompt is TEXT + ITEMS * ROWS random text
tokens. The two engines run the same batch in alternating rounds; medians and the ratio are printed
(goal >= 0.9).

Usage: python benchmarks/multimodal_qwen3_throughput.py [--requests 64] [--text 64] [--items 4] [--rows 16]
       [--max-tokens 32] [--rounds 3] [--hidden 512] [--layers 4] [--quick]
--quick: the test checkpoints (hidden 64, 2 layers), 8 requests, 4 generated tokens, one round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch
from vllm import LLM, SamplingParams

from vllm_omni.config.multimodal_qwen3 import modalities_from_config
from vllm_omni.testing.tiny_models import MM_QWEN3_MODALITIES, TEXT_DIMS, build_qwen3, tiny_model_path
from vllm_omni.transformers_utils.multimodal_qwen3_builder import build_multimodal_qwen3

TEXT_VOCAB = 480  # token ids below the tiny folders' vocabulary size and placeholders
ENGINE_ARGS = dict(
    dtype="float32", max_model_len=1024, max_num_seqs=64, enforce_eager=True, kv_cache_memory_bytes=1 << 29
)


def prompts(args, placeholder_ids: dict[str, int] | None, seed: int) -> list[dict]:
    """One batch of ``args.requests`` prompts, multimodal if ``placeholder_ids`` is given; different seeds
    give different tokens and embeddings."""
    g, multimodal = torch.Generator().manual_seed(seed), placeholder_ids is not None
    batch = []
    for _ in range(args.requests):
        n_text = args.text if multimodal else args.text + args.items * args.rows
        ids = torch.randint(0, TEXT_VOCAB, (n_text,), generator=g).tolist()
        if not multimodal:
            batch.append({"prompt_token_ids": ids})
            continue
        names = [("audio", "vision")[i % 2] for i in range(args.items)]
        items: dict[str, list[torch.Tensor]] = {}
        for name in names:
            items.setdefault(name, []).append(torch.randn(args.rows, MM_QWEN3_MODALITIES[name], generator=g))
        ids = [placeholder_ids[name] for name in names] + ids
        batch.append({"prompt_token_ids": ids, "multi_modal_data": {"multimodal_embeddings": items}})
    return batch


def folders(args, tmp: Path) -> tuple[str, str]:
    """Plain and multimodal folders: the test checkpoints at hidden 64 / 2 layers, else built in ``tmp``."""
    if (args.hidden, args.layers) == (TEXT_DIMS["hidden_size"], TEXT_DIMS["num_hidden_layers"]):
        return tiny_model_path("qwen3"), tiny_model_path("multimodal_qwen3")
    heads = args.hidden // 64
    dims = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64)  # fmt: skip
    build_qwen3(tmp / "plain", **dims)
    build_multimodal_qwen3(tmp / "plain", tmp / "multimodal", MM_QWEN3_MODALITIES, args.hidden)
    return str(tmp / "plain"), str(tmp / "multimodal")


def tokens_per_second(llm: LLM, batch: list[dict], params: SamplingParams) -> float:
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--text", type=int, default=64, help="text tokens of a multimodal prompt")
    parser.add_argument("--items", type=int, default=4, help="embedding items per multimodal prompt")
    parser.add_argument("--rows", type=int, default=16, help="positions per item")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="LM hidden size (64 = the test checkpoint)")
    parser.add_argument("--layers", type=int, default=4)
    args = harness.parse_args(parser, requests=8, max_tokens=4, rounds=1, hidden=64, layers=2)

    from transformers import AutoConfig

    plain_path, mm_path = folders(args, Path(tempfile.mkdtemp(prefix="mmq-bench-")))
    specs = modalities_from_config(AutoConfig.from_pretrained(mm_path))
    placeholder_ids = {name: spec.placeholder_id for name, spec in specs.items()}
    engines = {
        "plain": LLM(plain_path, **ENGINE_ARGS),
        "multimodal": LLM(mm_path, **ENGINE_ARGS),
    }
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, llm in engines.items():
            ids = placeholder_ids if name == "multimodal" else None
            rate = tokens_per_second(llm, prompts(args, ids, seed=round_), params)
            if round_:
                rates[name].append(rate)
    plain, multimodal = (statistics.median(rates[name]) for name in ("plain", "multimodal"))
    total = args.text + args.items * args.rows
    print(f"LM hidden={args.hidden} layers={args.layers} requests={args.requests} prompt={total} tokens "
          f"({args.items} items x {args.rows} rows + {args.text} text) max_tokens={args.max_tokens} "
          f"rounds={args.rounds}")  # fmt: skip
    print(f"throughput tokens/s (prompt + generated): plain Qwen3 {plain:.0f}  multimodal Qwen3 "
          f"{multimodal:.0f}  ratio multimodal/plain {multimodal / plain:.3f}")  # fmt: skip
    harness.config(
        f"random LM hidden {args.hidden}, {args.layers} layers; {args.requests} requests of "
        f"{total} prompt positions, {args.max_tokens} generated, {args.rounds} rounds"
    )
    harness.headline("tokens/s, multimodal Qwen3 / plain Qwen3", multimodal / plain, ">= 0.9")
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
