"""``CompletionOutput`` with ``mm_embedding`` (swapped into ``vllm.outputs``)."""

from dataclasses import dataclass

import torch
from vllm.outputs import CompletionOutput, RequestOutput

from vllm_omni.multimodal.mm_embedding import MMEmbeddingItem


@dataclass
class OmniCompletionOutput(CompletionOutput):
    """vLLM's completion output plus the prompt's multimodal encoder embeddings.

    Attributes:
        mm_embedding: CPU tensor ``(num_embeds, hidden)``: the output of the model's
            ``embed_multimodal`` for every returned item of the prompt, concatenated in prompt order;
            ``None`` for text-only prompts and models, or when the feature is off for the request.
        mm_embedding_items: Where each item's rows are (modality, item index, offset, length).
    """

    mm_embedding: torch.Tensor | None = None
    mm_embedding_items: list[MMEmbeddingItem] | None = None

    def __repr__(self) -> str:
        stock = super().__repr__()
        if self.mm_embedding is None:
            return stock[:-1] + ", mm_embedding=None)"
        shape = tuple(self.mm_embedding.shape)
        return stock[:-1] + f", mm_embedding=Tensor(shape={shape}, dtype={self.mm_embedding.dtype}))"


_stock_add = RequestOutput.add


def add_keeping_mm_embedding(self: RequestOutput, next_output: RequestOutput, aggregate: bool) -> None:
    """``RequestOutput.add`` that also carries ``mm_embedding`` when streamed outputs are merged."""
    _stock_add(self, next_output, aggregate)
    by_index = {completion.index: completion for completion in self.outputs}
    for completion in next_output.outputs:
        embedding = getattr(completion, "mm_embedding", None)
        if embedding is not None and completion.index in by_index:
            by_index[completion.index].mm_embedding = embedding
            by_index[completion.index].mm_embedding_items = completion.mm_embedding_items


def patch_outputs(module) -> None:
    """Swap ``CompletionOutput`` and make ``RequestOutput.add`` keep the embedding."""
    module.CompletionOutput = OmniCompletionOutput
    module.RequestOutput.add = add_keeping_mm_embedding
