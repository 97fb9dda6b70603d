"""Prompt hidden states over the OpenAI-compatible server (``/v1/chat/completions``, ``/v1/completions``).

Request fields (all optional; the server must run with ``--return-prompt-hidden-states``, and its
``--prompt-hidden-states-layer`` picks the layer)::

    "return_prompt_hidden_states": true,       # ask for them (default false)
    "prompt_hidden_states_dtype": "float16"    # auto (the model's) | float16 | bfloat16 | float32

Each choice then carries ``"prompt_hidden_states": {"data": <base64 of .npy bytes>, "shape":
[num_prompt_tokens, hidden], "dtype": "float32"}`` (``tensors``), one row per prompt token; streaming
responses send it in one extra chunk per request, right before ``data: [DONE]`` (``tensor_fields``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from vllm_omni.config.prompt_hidden_states import EXTRA_ARGS_KEY, configured_layer
from vllm_omni.entrypoints.openai.tensors import TensorField, encode_tensor
from vllm_omni.multimodal.mm_embedding import DTYPES


class PromptHiddenStatesRequestFields(BaseModel):
    """Fields added to ``ChatCompletionRequest`` and ``CompletionRequest``."""

    return_prompt_hidden_states: bool = Field(
        default=False,
        description="Return the hidden states of the prompt's tokens (the server's layer) in each choice.",
    )
    prompt_hidden_states_dtype: str = Field(
        default="auto", description="auto (the model's dtype), float16, bfloat16 or float32."
    )

    @field_validator("prompt_hidden_states_dtype")
    @classmethod
    def _check_dtype(cls, dtype: str) -> str:
        if dtype not in DTYPES:
            raise ValueError(f"prompt_hidden_states_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype

    def to_sampling_params(self, *args, **kwargs):
        params = super().to_sampling_params(*args, **kwargs)
        if self.return_prompt_hidden_states:
            params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: True}
        return params


def _encode(completion: Any, request: Any) -> dict[str, Any] | None:
    """The JSON form of one completion's prompt hidden states, cast here to the request's dtype."""
    tensor = getattr(completion, "prompt_hidden_states", None)
    if tensor is None:
        return None
    dtype = DTYPES[request.prompt_hidden_states_dtype]
    return encode_tensor(tensor if dtype is None else tensor.to(dtype))


def _enabled(serving: Any) -> bool:
    return configured_layer(serving.engine_client.vllm_config) is not None


PROMPT_HIDDEN_STATES = TensorField(
    name="prompt_hidden_states",
    request_fields=PromptHiddenStatesRequestFields,
    enabled=_enabled,
    not_enabled="return_prompt_hidden_states needs a server started with --return-prompt-hidden-states",
    encode=_encode,
)
