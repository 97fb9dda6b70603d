"""Per-position input extras: a model interface and how a request carries its tensor.

vLLM feeds a decoder one token id per position; some models condition every position on more than that
(Qwen2.5-Omni's talker adds the thinker's state of the matching reply token to each codec token it
reads). A model opts in with ``SupportsInputExtras``: its ``forward`` takes ``input_extras``, a
``(num_tokens, input_extras_width)`` tensor whose row ``i`` belongs to the ``i``-th scheduled token.

A request carries its extras as one ``(rows, input_extras_width)`` float tensor, row ``p`` for the token
at position ``p`` of its sequence (prompt, then generated tokens); a position past the last row reads
the last row (a model conditions every later token the same way with one row). The tensor travels in
``SamplingParams.extra_args[INPUT_EXTRAS_KEY]`` as bytes with its dtype and shape (``input_extras_arg``):
vLLM's msgpack passes untyped values (``extra_args``) through as msgpack data, not as tensors. The
worker (``vllm_omni.v1.worker.input_extras``) decodes it once per request, gathers the rows of each
step's tokens and frees it when the request finishes or is aborted.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

INPUT_EXTRAS_KEY = "input_extras"
"""The ``SamplingParams.extra_args`` key of a request's extras."""


@runtime_checkable
class SupportsInputExtras(Protocol):
    """A model whose ``forward`` takes ``input_extras``: the scheduled tokens' rows of their requests'
    extras tensors, ``(num_tokens, input_extras_width)`` (rows of requests without extras, padding
    tokens and dummy runs' tokens are zeros; ``None`` in profiling and warm-up runs)."""

    supports_input_extras: ClassVar[bool]
    input_extras_width: int


def supports_input_extras(model: object) -> bool:
    """Whether ``model`` opted into per-position input extras."""
    return bool(getattr(model, "supports_input_extras", False))


def input_extras_arg(extras: torch.Tensor) -> dict[str, Any]:
    """``extras`` (2-D, floating point, finite) as the ``extra_args`` value vLLM carries to the worker."""
    if not isinstance(extras, torch.Tensor) or extras.ndim != 2 or not extras.is_floating_point():
        raise ValueError(f"input_extras must be a 2-D float tensor, got {_describe(extras)}")
    if extras.shape[0] == 0 or not torch.isfinite(extras).all():
        raise ValueError("input_extras must have at least one row and only finite values")
    extras = extras.detach().cpu().contiguous()
    data = extras.view(torch.uint8).numpy().tobytes()
    return {"dtype": str(extras.dtype).removeprefix("torch."), "shape": list(extras.shape), "data": data}


def with_input_extras(params: Any, extras: torch.Tensor) -> Any:
    """A copy of ``params`` (``SamplingParams``) carrying ``extras``."""
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), INPUT_EXTRAS_KEY: input_extras_arg(extras)}
    return params


def move_prompt_extras(prompt: Any, params: Any) -> tuple[Any, Any]:
    """A prompt dict may hold its request's extras under ``INPUT_EXTRAS_KEY`` (a stage-input function
    builds both): ``(prompt without them, params carrying them)``; other prompts pass unchanged."""
    if not isinstance(prompt, dict) or INPUT_EXTRAS_KEY not in prompt:
        return prompt, params
    prompt = dict(prompt)
    return prompt, with_input_extras(params, prompt.pop(INPUT_EXTRAS_KEY))


def read_input_extras(arg: dict[str, Any]) -> torch.Tensor:
    """The tensor ``input_extras_arg`` encoded."""
    dtype = getattr(torch, arg["dtype"])
    return torch.frombuffer(bytearray(arg["data"]), dtype=dtype).reshape(arg["shape"])


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.ndim}-D {value.dtype} tensor"
    return type(value).__name__
