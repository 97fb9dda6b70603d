"""``CompletionOutput`` with vllm-omni's per-request outputs (swapped into ``vllm.outputs``)."""

from dataclasses import dataclass

import torch
from vllm.outputs import CompletionOutput, RequestOutput

from vllm_omni.multimodal.mm_embedding import MMEmbeddingItem

# Fields that RequestOutput.add carries over when streamed outputs are merged.
KEPT_FIELDS = ("mm_embedding", "mm_embedding_items", "prompt_hidden_states", "hidden_states")


@dataclass
class OmniCompletionOutput(CompletionOutput):
    """vLLM's completion output plus the prompt's multimodal encoder embeddings and hidden states.

    Attributes:
        mm_embedding: CPU tensor ``(num_embeds, hidden)``: the output of the model's
            ``embed_multimodal`` for every returned item of the prompt, concatenated in prompt order;
            ``None`` for text-only prompts and models, or when the feature is off for the request.
        mm_embedding_items: Where each item's rows are (modality, item index, offset, length).
        prompt_hidden_states: CPU tensor ``(num_prompt_tokens, hidden)`` in the model dtype: the
            prompt's hidden states of the engine's ``prompt_hidden_states_layer`` (transformers'
            ``output_hidden_states`` indexing), one row per prompt token; ``None`` unless the engine
            has ``return_prompt_hidden_states`` on with one layer and the request asked for them.
        hidden_states: ``{layer: CPU tensor (num_rows, hidden)}`` in the model dtype, one entry per
            layer of ``prompt_hidden_states_layer`` as configured, rows in position order: the prompt's
            (engines configured with a list of layers; requests asking ``True``), or the prompt's then
            every generated token fed back to the model, ``num_prompt_tokens + num_output_tokens - 1``
            rows, in the final output (requests asking ``"all"``); ``None`` otherwise.
    """

    mm_embedding: torch.Tensor | None = None
    mm_embedding_items: list[MMEmbeddingItem] | None = None
    prompt_hidden_states: torch.Tensor | None = None
    hidden_states: dict[int, torch.Tensor] | None = None

    def __repr__(self) -> str:
        stock = super().__repr__()
        return (
            f"{stock[:-1]}, mm_embedding={_describe(self.mm_embedding)}, "
            f"prompt_hidden_states={_describe(self.prompt_hidden_states)}, "
            f"hidden_states={_describe_layers(self.hidden_states)})"
        )


def _describe(tensor: torch.Tensor | None) -> str:
    return "None" if tensor is None else f"Tensor(shape={tuple(tensor.shape)}, dtype={tensor.dtype})"


def _describe_layers(layers: dict[int, torch.Tensor] | None) -> str:
    if layers is None:
        return "None"
    return "{" + ", ".join(f"{layer}: {_describe(tensor)}" for layer, tensor in layers.items()) + "}"


_stock_add = RequestOutput.add


def add_keeping_omni_fields(self: RequestOutput, next_output: RequestOutput, aggregate: bool) -> None:
    """``RequestOutput.add`` that also carries vllm-omni's fields when streamed outputs are merged."""
    _stock_add(self, next_output, aggregate)
    by_index = {completion.index: completion for completion in self.outputs}
    for completion in next_output.outputs:
        if completion.index not in by_index:
            continue
        for field in KEPT_FIELDS:
            value = getattr(completion, field, None)
            if value is not None:
                setattr(by_index[completion.index], field, value)


def patch_outputs(module) -> None:
    """Swap ``CompletionOutput`` and make ``RequestOutput.add`` keep vllm-omni's fields."""
    module.CompletionOutput = OmniCompletionOutput
    module.RequestOutput.add = add_keeping_omni_fields
