"""Build a multimodal Qwen3 folder from any Qwen3 folder: one MLP projector and placeholder per modality.

CLI::

    python -m vllm_omni.transformers_utils.multimodal_qwen3_builder --base QWEN3_DIR --out DIR \\
        --modality audio=768 --modality vision=512 [--projector-hidden-size 1024] [--projectors FILE]

The base folder is copied unchanged (same weight names, so vLLM's Qwen3 loader reads it), the tokenizer
gains one special placeholder token per modality (``<|audio|>``...), and the projectors are written to
``multi_modal_projectors.safetensors``: random (seeded) or taken from ``--projectors``, a safetensors file
with the same key names (what ``examples/training/train_projectors.py`` saves). If the tokenizer grows past
the model's vocabulary, the embeddings are resized with transformers' mean resizing.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_omni.config.multimodal_qwen3 import (
    ARCHITECTURE,
    CONFIG_KEY,
    ModalitySpec,
    check_modality_name,
    modalities_to_config,
    placeholder_text,
)

PROJECTORS_FILE = "multi_modal_projectors.safetensors"
PREFIX = "multi_modal_projectors"
INDEX_FILE = "model.safetensors.index.json"


def build_multimodal_qwen3(
    base: str | Path,
    out: str | Path,
    modalities: dict[str, int],
    projector_hidden_size: int | None = None,
    projectors: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Write a multimodal Qwen3 folder to ``out``; ``modalities`` maps name -> input width.

    ``projector_hidden_size`` defaults to the LM's hidden size. Returns ``out``.
    """
    from transformers import AutoConfig, AutoTokenizer

    base, out = Path(base), Path(out)
    if not modalities:
        raise ValueError("modalities: give at least one name=width")
    for name, width in modalities.items():
        check_modality_name(name)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"modality {name!r}: input width must be a positive integer, got {width!r}")
    config = AutoConfig.from_pretrained(base)
    if config.model_type != "qwen3":
        raise ValueError(f"{base} is a {config.model_type!r} checkpoint; the base must be a Qwen3 folder")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([placeholder_text(name) for name in modalities], special_tokens=True)
    tokenizer.save_pretrained(out)
    if len(tokenizer) > config.vocab_size:
        _resize_vocabulary(base, out, len(tokenizer), seed)

    hidden = projector_hidden_size or config.hidden_size
    weights = _projector_weights(modalities, hidden, config.hidden_size, projectors, seed)
    save_file(weights, out / PROJECTORS_FILE, metadata={"format": "pt"})
    _add_to_index(out, weights)

    specs = {
        name: ModalitySpec(
            input_width=width,
            hidden_size=weights[f"{PREFIX}.{name}.linear_1.weight"].shape[0],
            placeholder=placeholder_text(name),
            placeholder_id=tokenizer.convert_tokens_to_ids(placeholder_text(name)),
        )
        for name, width in modalities.items()
    }
    raw = json.loads((out / "config.json").read_text())
    raw["architectures"] = [ARCHITECTURE]
    raw[CONFIG_KEY] = modalities_to_config(specs)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def _projector_weights(
    modalities: dict[str, int], hidden: int, lm_hidden: int, projectors: str | Path | None, seed: int
) -> dict[str, torch.Tensor]:
    if projectors is not None:
        return _checked_projectors(load_file(str(projectors)), modalities, lm_hidden, projectors)
    torch.manual_seed(seed)
    weights = {}
    for name, width in modalities.items():
        for layer, (n_in, n_out) in (("linear_1", (width, hidden)), ("linear_2", (hidden, lm_hidden))):
            linear = torch.nn.Linear(n_in, n_out)
            weights[f"{PREFIX}.{name}.{layer}.weight"] = linear.weight.detach().contiguous()
            weights[f"{PREFIX}.{name}.{layer}.bias"] = linear.bias.detach().contiguous()
    return weights


def _checked_projectors(weights: dict, modalities: dict[str, int], lm_hidden: int, source) -> dict:
    """``weights`` if they hold exactly the projectors of ``modalities`` with matching shapes."""
    expected = {f"{PREFIX}.{m}.{layer}.{p}" for m in modalities for layer in ("linear_1", "linear_2")
                for p in ("weight", "bias")}  # fmt: skip
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{source}: projector keys do not match the modalities (missing {missing}, extra {extra})"
        )
    for name, width in modalities.items():
        w1, w2 = weights[f"{PREFIX}.{name}.linear_1.weight"], weights[f"{PREFIX}.{name}.linear_2.weight"]
        if w1.shape[1] != width or w2.shape != (lm_hidden, w1.shape[0]):
            raise ValueError(
                f"{source}: projector {name!r} maps {w1.shape[1]} -> {w1.shape[0]} -> {w2.shape[0]}, "
                f"expected input width {width} and output {lm_hidden} (the LM hidden size)"
            )
    return {key: value.contiguous() for key, value in weights.items()}


def _resize_vocabulary(base: Path, out: Path, size: int, seed: int) -> None:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(base, dtype="auto")
    torch.manual_seed(seed)  # mean resizing samples the new rows
    model.resize_token_embeddings(size, mean_resizing=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.bin"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    model.save_pretrained(out)


def _add_to_index(out: Path, weights: dict[str, torch.Tensor]) -> None:
    """Sharded checkpoints list their files in an index that vLLM reads: add the projectors' file to it."""
    index_path = out / INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].update(dict.fromkeys(weights, PROJECTORS_FILE))
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def _modality(text: str) -> tuple[str, int]:
    name, sep, width = text.partition("=")
    if not sep or not width.isdigit():
        raise argparse.ArgumentTypeError(f"--modality expects NAME=WIDTH (e.g. audio=768), got {text!r}")
    return name, int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="a Qwen3 folder (config.json, weights, tokenizer)")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--modality", type=_modality, action="append", required=True, metavar="NAME=WIDTH")
    parser.add_argument("--projector-hidden-size", type=int, help="default: the LM's hidden size")
    parser.add_argument("--projectors", help="safetensors file with trained projectors (default: random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random projectors")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.modality]
    if len(set(names)) != len(names):
        parser.error(f"--modality names must be unique, got {names}")
    out = build_multimodal_qwen3(
        args.base, args.out, dict(args.modality), args.projector_hidden_size, args.projectors, args.seed
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
