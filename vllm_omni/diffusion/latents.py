"""Latents in and out of a DiT request: the cut of a schedule at ``denoising_start`` / ``denoising_end``.

A request may start from given latents (``prompt["latents"]``) instead of fresh noise, and may stop before
the end of its schedule (``denoising_end``) and return its latents partly denoised, so that two stages split
one denoising: diffusers' ensemble of expert denoisers (``StableDiffusionXLPipeline(denoising_end=f)`` ->
``StableDiffusionXLImg2ImgPipeline(denoising_start=f)``). The cut follows diffusers' rule, so a split here
runs the steps a split there runs: a fraction ``f`` of a schedule ends at the timestep
``round(T - f * T)`` (``T``: the scheduler's ``num_train_timesteps``); the timesteps at or above it are
before the cut, those below it after. Fractions 0 and 1 cut nothing (diffusers ignores them too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def denoising_range(
    timesteps: torch.Tensor, num_train_timesteps: int, start: float | None, end: float | None
) -> tuple[int, int]:
    """``[begin, end)`` indices of the descending ``timesteps`` after the cut at fraction ``start`` and before
    the one at ``end`` (None: no cut there)."""
    begin, stop = 0, len(timesteps)
    if start:
        begin = _num_before(timesteps, num_train_timesteps, start)
    if end is not None and end < 1:
        stop = _num_before(timesteps, num_train_timesteps, end)
    return begin, stop


def _num_before(timesteps: torch.Tensor, num_train_timesteps: int, fraction: float) -> int:
    cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
    return int((timesteps >= cutoff).sum())
