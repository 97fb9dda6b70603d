"""What a DiT stage's model takes in device memory: its weights, and the working memory of one request.

Both come from the diffusers folder alone (``model_index.json``, each component's ``config.json`` and the
headers of its safetensors files), without torch or the model, so that a pipeline can divide a GPU between
its stages before any of them starts. The weights are counted exactly (every tensor at the dtype the stage
casts it to); the working memory is an estimate (docs/features/omni_pipelines.md, "One GPU for AR and DiT
stages"): per request, the larger of two peaks, the denoiser's forward pass and the VAE decode::

    denoiser = rows * (image_tokens + TEXT_TOKENS) * width * ACTIVATION_FACTOR * dtype_bytes
    decode   = height * width_px * vae_channels * DECODE_FACTOR * dtype_bytes

with ``rows`` 2 under classifier-free guidance (the negative prompt's pass), 1 without;
``image_tokens = (height / scale / patch) * (width_px / scale / patch)``. A request's own tensors (latents,
conditioning, sampler) are a few MiB and covered by the factors.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_omni.transformers_utils.model_resolution import pipeline_components

if TYPE_CHECKING:
    from vllm_omni.config.dit import DiTConfig

GIB = 1 << 30
ACTIVATION_FACTOR = 16
"""Hidden-width tensors per token alive at the denoiser's peak (one block at a time under inference mode):
q, k, v and the attention output (4), the MLP's 4x hidden and its activation (8), residual, norm and
modulation outputs (4). Attention itself is computed blockwise (PyTorch SDPA's flash and memory-efficient
kernels, xformers): no token x token matrix."""
TEXT_TOKENS = 512
"""Text tokens the denoiser attends with at most (SD3: 77 CLIP + 256 T5 tokens; Z-Image: up to 512)."""
DECODE_FACTOR = 6
"""Full-resolution feature maps of ``block_out_channels[0]`` channels alive at the VAE decoder's peak: its
last up block takes twice those channels upsampled (2), convolves them (2) and narrows them (2)."""
DEFAULT_SIDE = 1024
"""Image side assumed when neither the stage config nor the denoiser's config gives a default size (the
native families' default)."""
WEIGHT_FILE = re.compile(r"^(model|diffusion_pytorch_model)(-\d+-of-\d+)?\.safetensors$")
"""The files ``from_pretrained`` loads without a ``variant`` (single or sharded)."""
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
"""Bytes per element of the safetensors dtypes."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of ``DiTConfig.dtype``."""


@dataclass(frozen=True)
class DiTMemoryEstimate:
    """A DiT model's weight bytes and the numbers its per-request working memory is estimated from."""

    weight_bytes: int
    """Every component's weights at the stage's dtype (floating tensors cast to it, others as stored)."""
    dtype_bytes: int
    """Bytes per activation element (``DiTConfig.dtype``)."""
    scale_factor: int
    """Image pixels per latent pixel, per side (``2 ** (len(vae.block_out_channels) - 1)``)."""
    patch_size: int
    """Latent pixels per denoiser token, per side."""
    hidden_width: int
    """The denoiser's hidden width (a transformer's inner dim; a UNet's first block channels)."""
    vae_channels: int
    """The VAE decoder's channels at full resolution (``block_out_channels[0]``)."""
    default_height: int
    """Height of a request that names none (``DiTConfig.height``, the denoiser's ``sample_size`` or 1024)."""
    default_width: int
    """Width of a request that names none."""

    @classmethod
    def from_folder(cls, folder: str | Path, config: DiTConfig) -> DiTMemoryEstimate:
        """The estimate for diffusers folder ``folder`` run as ``config`` says (dtype, default size)."""
        folder, dtype_bytes = Path(folder), DTYPE_BYTES[config.dtype]
        components = pipeline_components(folder)
        denoiser_name = next((name for name in ("transformer", "unet") if name in components), None)
        if denoiser_name is None or "vae" not in components:
            raise ValueError(f"{folder}: cannot estimate its memory: no transformer or unet, or no vae")
        denoiser, vae = _config(folder / denoiser_name), _config(folder / "vae")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        sample = denoiser.get("sample_size")  # in latent pixels, as the pipelines read it
        side = sample * scale if isinstance(sample, int) else DEFAULT_SIDE
        return cls(
            weight_bytes=sum(component_bytes(folder / name, dtype_bytes) for name in components),
            dtype_bytes=dtype_bytes,
            scale_factor=scale,
            patch_size=_patch_size(denoiser),
            hidden_width=_hidden_width(denoiser, folder / denoiser_name),
            vae_channels=vae["block_out_channels"][0],
            default_height=config.height or side,
            default_width=config.width or side,
        )

    def request_bytes(self, height: int | None = None, width: int | None = None, guided: bool = True) -> int:
        """Working bytes of one running request at ``height`` x ``width`` (None: the default size)."""
        height, width = height or self.default_height, width or self.default_width
        tokens = (height // self.scale_factor // self.patch_size) * (
            width // self.scale_factor // self.patch_size
        )
        rows = 2 if guided else 1
        denoiser = rows * (tokens + TEXT_TOKENS) * self.hidden_width * ACTIVATION_FACTOR
        decode = height * width * self.vae_channels * DECODE_FACTOR
        return max(denoiser, decode) * self.dtype_bytes


def check_fits(needed: int, budget: int, height: int | None, width: int | None) -> None:
    """Refuse (``ValueError``) a request whose working memory (``needed`` bytes) alone is over the stage's
    ``DiTConfig.memory_budget``: it could never join the running batch."""
    if needed > budget:
        size = "default-size" if height is None else f"{height}x{width}"
        raise ValueError(
            f"a {size} request needs ~{needed / GIB:.2f} GiB of working memory, over DiTConfig.memory_budget "
            f"({budget / GIB:.2f} GiB); ask for a smaller image or raise the budget"
        )


def component_bytes(folder: Path, dtype_bytes: int) -> int:
    """Bytes of a component's weights once loaded at ``dtype_bytes`` per floating element: its safetensors
    files as their headers describe them (0 for a component without weights, e.g. a scheduler)."""
    return sum(safetensors_bytes(path, dtype_bytes) for path in folder.glob("*.safetensors")
               if WEIGHT_FILE.match(path.name))  # fmt: skip


def safetensors_bytes(path: Path, dtype_bytes: int | None = None) -> int:
    """Bytes of the tensors of safetensors file ``path`` (its header only is read: 8 bytes of length, then
    JSON); floating tensors counted at ``dtype_bytes`` per element when given, every other as stored."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in entry["shape"]:
            count *= size
        floating = entry["dtype"].startswith(("F", "BF"))
        total += count * (dtype_bytes if floating and dtype_bytes else STORED_BYTES[entry["dtype"]])
    return total


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _patch_size(config: dict) -> int:
    patch = config.get("patch_size", config.get("all_patch_size", 1))
    return patch[0] if isinstance(patch, list) else patch or 1


def _hidden_width(config: dict, where: Path) -> int:
    """A transformer's inner width (``dim``, heads x head dim, ``hidden_size``) or a UNet's first channels."""
    if "block_out_channels" in config:
        return config["block_out_channels"][0]
    if "dim" in config:
        return config["dim"]
    if isinstance(config.get("num_attention_heads"), int) and isinstance(
        config.get("attention_head_dim"), int
    ):
        return config["num_attention_heads"] * config["attention_head_dim"]
    if "hidden_size" in config:
        return config["hidden_size"]
    raise ValueError(f"{where}/config.json: no hidden width (dim, num_attention_heads x attention_head_dim)")
