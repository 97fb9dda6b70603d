"""A code2wav request as plain data: its params, what the stage accepts (limits), its output, its chunks.

Nothing here needs torch or the model, so the pipeline manager checks a request's params against the
limits the stage published before any stage computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from vllm_omni.config.utils import from_known_keys

SAMPLE_RATE = 24000
"""Qwen2.5-Omni's output rate (Hz): 50 mel frames a second, 480 samples each (the checkpoint's config
does not carry it)."""


@dataclass
class Code2WavParams:
    """Per-request options of a ``code2wav`` stage."""

    voice: str = "Chelsie"
    """The speaker of ``spk_dict.pt`` whose conditioning and reference mel the DiT gets (transformers'
    default voice)."""
    seed: int = 0
    """Seed of the request's own generator, which draws the DiT's initial noise (one draw for the whole
    code sequence, as ``torch.manual_seed(seed)`` before transformers' token2wav would)."""
    num_steps: int | None = None
    """ODE time points of the DiT's Runge-Kutta solver (``num_steps - 1`` RK4 steps); None: transformers'
    token2wav default (10)."""
    chunk_size: int | None = None
    """Codes per chunk: the audio is made chunk by chunk, each chunk one engine step; None: in one go."""
    left_context: int = 24
    """Codes before a chunk the DiT and the vocoder also see (rounded up to whole DiT blocks)."""
    right_context: int = 12
    """Codes after a chunk the DiT and the vocoder also see (what a streaming talker must have emitted
    before the chunk can be made)."""
    emit_chunks: bool = False
    """Send each chunk as it is made (a snapshot per chunk); set by the pipeline when it streams."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Code2WavParams:
        """Params from a dict of their fields (unknown keys refused, naming the allowed ones)."""
        return from_known_keys(cls, values, "Code2WavParams has unknown key(s)")


@dataclass(frozen=True)
class Code2WavLimits:
    """What one code2wav stage accepts (picklable, torch-free)."""

    voices: tuple[str, ...]
    """The voices of the checkpoint's ``spk_dict.pt``."""
    num_codes: int
    """Code ids must be in ``[0, num_codes)`` (the DiT's codec embedding rows)."""
    max_codes: int
    """Most codes a request may bring (the DiT's ``max_position_embeddings`` over its ``repeats``)."""
    max_num_requests: int
    """Most requests in the stage at once (running + waiting)."""

    def check_params(self, params: Code2WavParams) -> None:
        """ValueError naming the field of ``params`` the stage would refuse."""
        if params.voice not in self.voices:
            raise ValueError(f"voice must be one of {list(self.voices)}, got {params.voice!r}")
        _require(isinstance(params.seed, int), "seed", "an integer", params.seed)
        if params.num_steps is not None:
            _require(_is_int(params.num_steps, 2), "num_steps", "an integer >= 2 or None", params.num_steps)
        if params.chunk_size is not None:
            _require(
                _is_int(params.chunk_size, 1), "chunk_size", "an integer >= 1 or None", params.chunk_size
            )
        for name in ("left_context", "right_context"):
            _require(_is_int(getattr(params, name), 0), name, "an integer >= 0", getattr(params, name))

    def check_codes(self, codes: Any) -> list[int]:
        """The prompt's ``codes`` as a list of ints (ValueError naming ``codes`` otherwise)."""
        if not isinstance(codes, (list, tuple)) or not codes or not all(_is_int(c, 0) for c in codes):
            raise ValueError("codes must be a non-empty list of codec token ids (integers >= 0)")
        if len(codes) > self.max_codes:
            raise ValueError(f"codes holds {len(codes)} ids; at most {self.max_codes} are allowed")
        if max(codes) >= self.num_codes:
            raise ValueError(f"codes must be in [0, {self.num_codes}), got {max(codes)}")
        return [int(c) for c in codes]


@dataclass
class Code2WavOutput:
    """A code2wav stage's audio for one request: the whole waveform, or one chunk of it while it streams."""

    request_id: str
    waveform: np.ndarray
    """Float32 samples in [-1, 1] at ``sample_rate``, starting at ``sample_offset`` of the request's audio."""
    sample_offset: int
    """Where ``waveform`` starts in the request's audio (0 for the whole waveform)."""
    num_codes: int
    """Codes the request brought (the whole audio is ``num_codes`` x samples per code long)."""
    finished: bool
    """Whether this is the request's last output (its audio ends with ``waveform``)."""
    sample_rate: int = SAMPLE_RATE


@dataclass(frozen=True)
class ChunkWindow:
    """One chunk of a request: the codes it makes audio for and the wider window the DiT runs on."""

    start: int
    """First code of the chunk."""
    end: int
    """One past the chunk's last code."""
    window_start: int
    """First code the DiT and the vocoder see (a DiT block boundary)."""
    window_end: int
    """One past the last code they see."""


def chunk_windows(num_codes: int, params: Code2WavParams, block_codes: int) -> list[ChunkWindow]:
    """The chunks of a request of ``num_codes`` codes: one (the whole) without ``chunk_size``; otherwise
    ``chunk_size`` codes each, with the context around them, windows starting on DiT block boundaries
    (``block_codes`` codes a block) so that the DiT's block attention groups frames as in the whole run."""
    size = params.chunk_size or num_codes
    windows = []
    for start in range(0, num_codes, size):
        end = min(start + size, num_codes)
        window_start = max(0, start - params.left_context) // block_codes * block_codes
        windows.append(ChunkWindow(start, end, window_start, min(num_codes, end + params.right_context)))
    return windows


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
