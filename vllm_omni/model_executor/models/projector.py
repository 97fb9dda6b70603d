"""The per-modality projector of multimodal Qwen3: plain PyTorch, shared by the vLLM model and training."""

from __future__ import annotations

import torch
from torch import nn


class MultiModalProjector(nn.Module):
    """2-layer MLP with ReLU: ``input_width -> hidden_size -> LM hidden size``.

    Weight names (``linear_1``, ``linear_2``) are the checkpoint's: ``multi_modal_projectors.<modality>.*``.
    """

    def __init__(self, input_width: int, hidden_size: int, lm_hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(input_width, hidden_size)
        self.act = nn.ReLU()
        self.linear_2 = nn.Linear(hidden_size, lm_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
