"""Per-request options of multimodal-embedding return, and the per-item description users get back.

Options ride in ``SamplingParams.extra_args["mm_embedding"]`` (vLLM's own slot for custom per-request
arguments), so they cross to the EngineCore and workers with the request. Build them with
``MMEmbeddingParams(...).to_extra_args()`` or pass the dict directly::

    SamplingParams(extra_args={"mm_embedding": {"modalities": ["image"], "dtype": "float16"}})
    SamplingParams(extra_args={"mm_embedding": {"enabled": False}})  # opt this request out
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

EXTRA_ARGS_KEY = "mm_embedding"
DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
POOLINGS = ("none", "mean")


@dataclass(frozen=True)
class MMEmbeddingParams:
    """What one request wants back.

    Attributes:
        enabled: ``False`` opts this request out when the engine has the feature on.
        modalities: Keep only these modalities (e.g. ``["image"]``); ``None`` keeps all.
        dtype: ``"auto"`` (as the encoder computed it), ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        pooling: ``"none"`` (one row per embedding position) or ``"mean"`` (one row per item).
    """

    enabled: bool = True
    modalities: tuple[str, ...] | None = None
    dtype: str = "auto"
    pooling: str = "none"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"mm_embedding.enabled must be true or false, got {self.enabled!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"mm_embedding.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"mm_embedding.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"
            )
        if self.modalities is not None:
            if isinstance(self.modalities, str) or not all(isinstance(m, str) for m in self.modalities):
                raise ValueError(
                    f"mm_embedding.modalities must be a list of modality names, got {self.modalities!r}"
                )
            object.__setattr__(self, "modalities", tuple(self.modalities))

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> MMEmbeddingParams:
        """Parse (and validate) the options of a request; defaults when it gives none."""
        options = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if options is None:
            return cls()
        if isinstance(options, MMEmbeddingParams):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"extra_args['mm_embedding'] must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - {"enabled", "modalities", "dtype", "pooling"})
        if unknown:
            raise ValueError(
                f"unknown mm_embedding option(s) {', '.join(unknown)}; "
                "allowed: enabled, modalities, dtype, pooling"
            )
        return cls(**options)

    def to_extra_args(self) -> dict[str, Any]:
        """``extra_args`` for ``SamplingParams`` carrying these options."""
        options = asdict(self)
        if self.modalities is not None:
            options["modalities"] = list(self.modalities)
        return {EXTRA_ARGS_KEY: options}

    def wants(self, modality: str) -> bool:
        """Whether items of ``modality`` are returned."""
        return self.enabled and (self.modalities is None or modality in self.modalities)

    def num_wanted(self, mm_features) -> int:
        """How many of a request's multimodal items (``mm_features``) are returned."""
        return sum(self.wants(feature.modality) for feature in mm_features)

    def postprocess(self, embedding: torch.Tensor) -> torch.Tensor:
        """Pool and cast one item's encoder output, still on its device (before the host copy)."""
        if self.pooling == "mean":
            embedding = embedding.float().mean(dim=0, keepdim=True)
        dtype = DTYPES[self.dtype]
        return embedding if dtype is None else embedding.to(dtype)


@dataclass(frozen=True)
class MMEmbeddingItem:
    """Where one multimodal item's rows sit in ``CompletionOutput.mm_embedding``.

    Attributes:
        modality: e.g. ``"image"``.
        index: The item's index among the prompt's multimodal items (all modalities, prompt order).
        offset: First row of the item in the concatenated tensor.
        length: Number of rows (1 with ``pooling="mean"``).
    """

    modality: str
    index: int
    offset: int
    length: int
