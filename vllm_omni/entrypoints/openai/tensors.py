"""Tensors in JSON responses: ``{"data": <base64 of .npy bytes>, "shape": [...], "dtype": "float32"}``.

bfloat16, which ``.npy`` cannot hold, travels as its raw 16-bit patterns (``uint16``) with ``dtype``
``"bfloat16"``. ``TensorField`` describes a per-completion tensor that chat and completion choices carry
(``tensor_fields`` serves them).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """The JSON form of a CPU tensor."""
    array = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return {
        "data": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }


@dataclass(frozen=True)
class TensorField:
    """A per-completion tensor that ``/v1/chat/completions`` and ``/v1/completions`` choices carry when the
    request asks for it with ``return_<name>: true``.

    Attributes:
        name: The ``CompletionOutput`` attribute and the key in each choice.
        request_fields: Pydantic mixin with the request fields (``return_<name>`` and its options), added
            to vLLM's request models; its ``to_sampling_params`` puts the options into ``extra_args``.
        enabled: Whether a serving object's engine returns it (``serving -> bool``).
        not_enabled: The 400 message for a request that asks a server without it.
        encode: ``(completion, request) -> dict | None``: the JSON form (``None`` when it has none).
    """

    name: str
    request_fields: type
    enabled: Callable[[Any], bool]
    not_enabled: str
    encode: Callable[[Any, Any], dict[str, Any] | None]

    @property
    def request_flag(self) -> str:
        """The request field that asks for it."""
        return f"return_{self.name}"

    def asked(self, request: Any) -> bool:
        """Whether ``request`` asks for it."""
        return bool(getattr(request, self.request_flag, False))
