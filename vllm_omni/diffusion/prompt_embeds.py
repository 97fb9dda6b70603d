"""Text conditioning given with a request as tensors: the prompt keys and the tensor checks.

An earlier stage (a vLLM LM) can do the text encoding, so a DiT prompt may carry ``prompt_embeds`` (and
``negative_prompt_embeds``; SD3 also ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``, diffusers'
argument names) instead of text. Each model family states the shapes it takes, which are those of what its
own ``encode`` returns for one text; this module checks a tensor against such a shape and casts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SIDES = ("", "negative_")
"""Key prefixes of the prompt's and of the negative prompt's tensors."""
EMBEDS_KEYS = tuple(side + key for side in SIDES for key in ("prompt_embeds", "pooled_prompt_embeds"))
"""Every prompt key that carries conditioning tensors (a family uses some of them)."""

Shape = tuple[int | range, ...]
"""Accepted sizes per dimension: an int is that size, a range any size in it."""


def checked_embeds(
    key: str, value: Any, shape: Shape, family: str, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """``value`` as a copy on ``device`` in ``dtype``, once it is a finite floating-point tensor of ``shape``.

    Raises ``ValueError`` naming ``key``, what was wrong and what ``family`` accepts.
    """
    import torch  # not at the top: DiffusionSamplingParams (request.py) imports this module torch-free

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise ValueError(f"{key} must be a floating-point tensor, got dtype {value.dtype}")
    if value.ndim != len(shape) or not all(map(_fits, value.shape, shape)):
        raise ValueError(f"{key} must have shape {describe(shape)} for {family}, got {tuple(value.shape)}")
    # A copy: the caller may reuse its tensor while the request is still denoising.
    tensor = value.detach().to(device=device, dtype=dtype, copy=True)
    if not bool(torch.isfinite(tensor).all()):  # after the cast: values beyond the stage dtype's range too
        raise ValueError(f"{key} must be finite in the stage's dtype {dtype} (it holds NaN or inf values)")
    return tensor


def describe(shape: Shape) -> str:
    """``shape`` as text, e.g. ``(1..512, 64)``."""
    sizes = [f"{s.start}..{s.stop - 1}" if isinstance(s, range) else str(s) for s in shape]
    return f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"


def _fits(size: int, allowed: int | range) -> bool:
    return size in allowed if isinstance(allowed, range) else size == allowed
