"""Tensors in JSON responses: ``{"data": <base64 of .npy bytes>, "shape": [...], "dtype": "float32"}``.

bfloat16, which ``.npy`` cannot hold, travels as its raw 16-bit patterns (``uint16``) with ``dtype``
``"bfloat16"``.
"""

from __future__ import annotations

import base64
import io
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
