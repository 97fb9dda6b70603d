"""mm_embedding over the OpenAI-compatible server (``/v1/chat/completions``, ``/v1/completions``).

Request fields (all optional; the server must run with ``--enable-return-mm-embedding``)::

    "return_mm_embedding": true,              # ask for it (default false)
    "mm_embedding_modalities": ["image"],     # keep only these modalities
    "mm_embedding_dtype": "float16",          # auto | float16 | bfloat16 | float32
    "mm_embedding_pooling": "mean"            # none | mean (one row per item)

Each choice then carries ``"mm_embedding": {"data": <base64 of .npy bytes>, "shape": [n, hidden],
"dtype": "float32", "items": [{"modality", "index", "offset", "length"}, ...]}`` (``tensors``); streaming
responses send it in one extra chunk per request, right before ``data: [DONE]`` (``tensor_fields``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, Field, model_validator

from vllm_omni.entrypoints.openai.tensors import TensorField, encode_tensor
from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams


class MMEmbeddingRequestFields(BaseModel):
    """Fields added to ``ChatCompletionRequest`` and ``CompletionRequest``."""

    return_mm_embedding: bool = Field(
        default=False, description="Return the prompt's multimodal encoder embeddings in each choice."
    )
    mm_embedding_modalities: list[str] | None = Field(
        default=None, description="Keep only these modalities (default: all)."
    )
    mm_embedding_dtype: str = Field(
        default="auto", description="auto (as computed), float16, bfloat16 or float32."
    )
    mm_embedding_pooling: str = Field(default="none", description="none or mean (one row per item).")

    @model_validator(mode="after")
    def _check_mm_embedding_options(self):
        self.mm_embedding_params()
        return self

    def mm_embedding_params(self) -> MMEmbeddingParams:
        """The per-request options; a bad value raises ``ValueError`` naming the request field."""
        try:
            return MMEmbeddingParams(
                enabled=self.return_mm_embedding,
                modalities=self.mm_embedding_modalities,
                dtype=self.mm_embedding_dtype,
                pooling=self.mm_embedding_pooling,
            )
        except ValueError as e:  # name the request field, not the SamplingParams option
            raise ValueError(str(e).replace("mm_embedding.", "mm_embedding_")) from None

    def to_sampling_params(self, *args, **kwargs):
        params = super().to_sampling_params(*args, **kwargs)
        params.extra_args = {**(params.extra_args or {}), **self.mm_embedding_params().to_extra_args()}
        return params


def _encode(completion: Any, request: Any) -> dict[str, Any] | None:
    """The JSON form of one completion's embedding (pooled and cast in the worker already)."""
    tensor = getattr(completion, "mm_embedding", None)
    if tensor is None:
        return None
    return {**encode_tensor(tensor), "items": [asdict(item) for item in completion.mm_embedding_items or []]}


def _enabled(serving: Any) -> bool:
    return bool(getattr(serving.model_config.multimodal_config, "enable_return_mm_embedding", False))


MM_EMBEDDING = TensorField(
    name="mm_embedding",
    request_fields=MMEmbeddingRequestFields,
    enabled=_enabled,
    not_enabled="return_mm_embedding needs a multimodal model served with --enable-return-mm-embedding",
    encode=_encode,
)
