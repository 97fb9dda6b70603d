"""``MultiModalConfig`` with the fields vllm-omni adds (swapped into ``vllm.config.multimodal``)."""

from vllm.config.multimodal import MultiModalConfig
from vllm.config.utils import config


@config
class OmniMultiModalConfig(MultiModalConfig):
    """Controls the behavior of multimodal models (vLLM's config plus vllm-omni's fields)."""

    enable_return_mm_embedding: bool = False
    """If `True`, every request's outputs carry the embeddings the multimodal encoder produced for
    its prompt (`CompletionOutput.mm_embedding`, a CPU tensor `(num_embeds, hidden)` in prompt order),
    unless the request opts out. Costs one device-to-host copy per item and the bytes returned;
    prompts of requests that ask for it skip prefix-cache reads so every item is seen."""


def swap_multimodal_config(module) -> None:
    """Make ``vllm.config.multimodal`` hand out the subclass (before ``vllm.config`` imports it)."""
    module.MultiModalConfig = OmniMultiModalConfig


def returns_mm_embedding(vllm_config) -> bool:
    """Whether the engine of ``vllm_config`` returns multimodal embeddings (``None``: no engine config)."""
    model_config = None if vllm_config is None else vllm_config.model_config
    mm_config = None if model_config is None else model_config.multimodal_config
    return bool(getattr(mm_config, "enable_return_mm_embedding", False))
