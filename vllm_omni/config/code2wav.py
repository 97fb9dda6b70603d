"""Code2WavConfig: the settings of a ``code2wav`` stage (its ``engine_args``), validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_omni.config.utils import from_known_keys


@dataclass
class Code2WavConfig:
    """How a ``code2wav`` stage batches and queues requests."""

    max_batch_size: int = 8
    """Most requests whose next chunk runs in one engine step (batched where their windows have one
    length and their voices' reference clips one shape)."""
    max_waiting_requests: int = 64
    """Most requests queued behind a full batch; the pipeline admits no more (``queue_bound``)."""

    def __post_init__(self) -> None:
        for name, least in (("max_batch_size", 1), ("max_waiting_requests", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Code2WavConfig:
        """A config from a stage's ``engine_args`` (unknown keys refused, naming the allowed ones)."""
        return from_known_keys(cls, values, "code2wav engine_args has unknown key(s)")
