"""Tiny random-weight checkpoints for tests, the demo and benchmarks (no hub access at run time).

Each builder makes a real Hugging Face folder with the real ``transformers`` classes at tiny size,
seeded and deterministic (Qwen2.5-Omni: see ``tiny_qwen2_5_omni``); the DiT families (``sd3``, ``z_image``,
see ``tiny_dit``) and the pipelines the diffusers executor runs (``sd2``, ``pixart_sigma``, ``flux``, see
``tiny_diffusers``) are diffusers folders.
``tiny_model_path(name)`` returns the cached folder and rebuilds it only when the builder's definition (the
source of its module and of the shared tokenizer, and the checkpoints it embeds) or the installed
``transformers``/``diffusers`` version changes.

CLI: ``python -m vllm_omni.testing.tiny_models --out DIR [NAMES...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_omni.testing import tiny_diffusers, tiny_dit, tiny_qwen2_5_omni
from vllm_omni.testing import tokenizer as tokenizer_module

CACHE_ENV = "VLLM_OMNI_TINY_MODELS_DIR"
SEED = 0

# Attention on CPU needs head_dim 32 (16 is rejected by vLLM's CPU attention backend).
TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=1024,
)


def build_qwen3(out: Path, **dims: int) -> None:
    """Qwen3ForCausalLM: 2 layers, hidden 64, ChatML tokenizer; ``dims`` override ``TEXT_DIMS`` (benchmarks
    build bigger ones)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tokenizer_module.build_tokenizer()
    config = Qwen3Config(
        architectures=["Qwen3ForCausalLM"],
        vocab_size=len(tok),
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.pad_token_id,
        **{**TEXT_DIMS, **dims},
    )
    torch.manual_seed(SEED)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8

# transformers 5 names LLaVA's weights model.vision_tower.* etc.; vLLM 0.32 loads the classic hub layout.
_LLAVA_CLASSIC_KEYS = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def build_llava(out: Path) -> None:
    """LlavaForConditionalGeneration: CLIP vision tower (32x32 images, 16 image tokens) + tiny Llama."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer_module.build_tokenizer(extra_special_tokens=(IMAGE_TOKEN,))
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TEXT_DIMS
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    state = {_classic_key(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer_module.CHAT_TEMPLATE,
    ).save_pretrained(out)


def _classic_key(key: str) -> str:
    for new, classic in _LLAVA_CLASSIC_KEYS:
        if key.startswith(new):
            return classic + key[len(new) :]
    return key


MM_QWEN3_MODALITIES = {"audio": 24, "vision": 16}


def build_multimodal_qwen3(out: Path) -> None:
    """MultimodalQwen3ForCausalLM over the tiny qwen3: modalities audio (width 24) and vision (width 16)."""
    from vllm_omni.transformers_utils.multimodal_qwen3_builder import build_multimodal_qwen3

    build_multimodal_qwen3(tiny_model_path("qwen3"), out, MM_QWEN3_MODALITIES, projector_hidden_size=32)


def build_qwen3_wide(out: Path) -> None:
    """The tiny qwen3 at hidden size 4096: a 300-token prompt's hidden states are 4.7 MiB (tests of big
    hand-offs between stages)."""
    build_qwen3(out, hidden_size=4096)


def build_z_image_wide(out: Path) -> None:
    """The tiny Z-Image conditioned on ``qwen3_wide``'s hidden states."""
    tiny_dit.build_z_image(out, text_encoder_model="qwen3_wide")


TINY_MODELS: dict[str, Callable[[Path], None]] = {
    "qwen3": build_qwen3,
    "llava": build_llava,
    "sd3": tiny_dit.build_sd3,
    "z_image": tiny_dit.build_z_image,
    "multimodal_qwen3": build_multimodal_qwen3,
    "sd2": tiny_diffusers.build_sd2,
    "pixart_sigma": tiny_diffusers.build_pixart_sigma,
    "flux": tiny_diffusers.build_flux,
    "qwen2_5_omni": tiny_qwen2_5_omni.build_qwen2_5_omni,
    "qwen3_wide": build_qwen3_wide,
    "z_image_wide": build_z_image_wide,
}
# Diffusers-format checkpoints, and the tiny checkpoints a checkpoint is made from (z_image's text encoder and
# tokenizer are qwen3's): both count in its fingerprint.
DIFFUSERS_FORMAT = frozenset({"sd3", "z_image", "z_image_wide", "sd2", "pixart_sigma", "flux"})
MADE_FROM: dict[str, tuple[str, ...]] = {
    "z_image": ("qwen3",),
    "z_image_wide": ("qwen3_wide",),
    "multimodal_qwen3": ("qwen3",),
}
# Modules besides the builder's own whose source defines a checkpoint.
BUILT_WITH: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("sd2", "pixart_sigma", "flux"), ("vllm_omni.testing.tiny_dit",)),  # tokenizers, VAE
    "z_image_wide": ("vllm_omni.testing.tiny_dit",),  # its builder
    "multimodal_qwen3": (
        "vllm_omni.transformers_utils.multimodal_qwen3_builder",
        "vllm_omni.config.multimodal_qwen3",
    ),
}


def cache_root() -> Path:
    """Where built checkpoints live: ``$VLLM_OMNI_TINY_MODELS_DIR`` or ``~/.cache/vllm_omni/tiny_models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "vllm_omni" / "tiny_models"


def fingerprint(name: str) -> str:
    """Hash of what defines checkpoint ``name``: its builder's module, the tokenizer, the checkpoints it is
    made from, transformers (and diffusers) versions."""
    import transformers

    builder = _builder(name)
    digest = hashlib.sha256()
    extra = [importlib.import_module(module) for module in BUILT_WITH.get(name, ())]
    for module in (inspect.getmodule(builder), tokenizer_module, *extra):
        digest.update(inspect.getsource(module).encode())
    digest.update(f"{name} {transformers.__version__} {torch.__version__}".encode())
    if name in DIFFUSERS_FORMAT:
        import diffusers

        digest.update(f" diffusers {diffusers.__version__}".encode())
    for source in MADE_FROM.get(name, ()):
        digest.update(f" {source} {fingerprint(source)}".encode())
    return digest.hexdigest()[:12]


def tiny_model_path(name: str) -> str:
    """Folder of tiny checkpoint ``name``, built on first use (safe when several processes race)."""
    final = cache_root() / f"{name}-{fingerprint(name)}"
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        tmp.chmod(0o755)
        _builder(name)(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp)
    return str(final)


def _builder(name: str) -> Callable[[Path], None]:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny random-weight checkpoints.")
    parser.add_argument("--out", required=True, help="folder to write <name>/ checkpoints into")
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(TINY_MODELS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(TINY_MODELS))
    if unknown:
        parser.error(f"unknown tiny model(s) {', '.join(unknown)}; available: {', '.join(TINY_MODELS)}")
    out = Path(args.out)
    for name in args.names or TINY_MODELS:
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tiny_model_path(name), target)
        print(target)


if __name__ == "__main__":
    main()
