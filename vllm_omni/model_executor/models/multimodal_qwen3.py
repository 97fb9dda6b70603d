"""MultimodalQwen3ForCausalLM: Qwen3 plus one MLP projector per named modality of raw embeddings.

The checkpoint is a Qwen3 checkpoint (same weight names) plus ``multi_modal_projectors.<name>.*``; its
``config.json`` lists the modalities (``vllm_omni.config.multimodal_qwen3``). Input processing lives in
``vllm_omni.multimodal.named_embeddings``. Registered with vLLM by ``vllm_omni.plugin``.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_omni.config.multimodal_qwen3 import modalities_from_config, placeholder_text
from vllm_omni.model_executor.models.projector import MultiModalProjector
from vllm_omni.multimodal.named_embeddings import (
    NamedEmbeddingsDummyInputsBuilder,
    NamedEmbeddingsProcessingInfo,
    NamedEmbeddingsProcessor,
    field_key,
)


@MULTIMODAL_REGISTRY.register_processor(
    NamedEmbeddingsProcessor,
    info=NamedEmbeddingsProcessingInfo,
    dummy_inputs=NamedEmbeddingsDummyInputsBuilder,
)
class MultimodalQwen3ForCausalLM(Qwen3ForCausalLM, SupportsMultiModal):
    """Qwen3 causal LM whose prompt may hold projected embeddings of any configured modality."""

    # Qwen3ForCausalLM's one-argument embed_input_ids comes first in the MRO; take the multimodal one.
    embed_input_ids = SupportsMultiModal.embed_input_ids

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return placeholder_text(modality)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.multi_modal_projectors = nn.ModuleDict(
            {
                name: MultiModalProjector(spec.input_width, spec.hidden_size, config.hidden_size)
                for name, spec in modalities_from_config(config).items()
            }
        )

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Projected ``(n, hidden)`` embeddings of each item, in item order (one modality per call)."""
        embeddings = []
        for name, projector in self.multi_modal_projectors.items():
            items = kwargs.get(field_key(name))
            if items is None:
                continue
            dtype = projector.linear_1.weight.dtype
            # A list of (n_i, width) tensors, or one (items, n, width) tensor when all have the same n.
            embeddings.extend(projector(item.to(dtype)) for item in items)
        return embeddings
