"""``EngineCoreOutput(s)`` with trailing per-request fields (swapped into ``vllm.v1.engine``).

``mm_embedding`` (the prompt's multimodal encoder embeddings), ``prompt_hidden_states`` (the
prompt's hidden states of the configured layer) and ``hidden_states`` (the rows of several layers, or of
the prompt and the generated tokens) are each sent once per request. Tensors cross
EngineCore -> frontend through vLLM's own ``MsgpackEncoder``/``MsgpackDecoder`` as out-of-band buffers
(no pickle, no copy into the message). Outputs without them cost one msgpack nil per
field (array-like structs are written in full), and a decoder built for the stock class drops them.
"""

import msgspec
import torch
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

from vllm_omni.multimodal.mm_embedding import MMEmbeddingItem


class MMEmbeddingOutput(msgspec.Struct, array_like=True, gc=False):
    """One request's encoder embeddings: rows of every returned item, concatenated in prompt order."""

    embedding: torch.Tensor
    modalities: list[str]
    indices: list[int]
    lengths: list[int]

    def items(self) -> list[MMEmbeddingItem]:
        """Per-item boundaries of ``embedding``."""
        items, offset = [], 0
        for modality, index, length in zip(self.modalities, self.indices, self.lengths, strict=True):
            items.append(MMEmbeddingItem(modality, index, offset, length))
            offset += length
        return items


class OmniEngineCoreOutput(EngineCoreOutput, array_like=True, omit_defaults=True, gc=False):
    """vLLM's per-request engine output plus the request's multimodal embeddings and hidden states
    (each sent once)."""

    mm_embedding: MMEmbeddingOutput | None = None
    prompt_hidden_states: torch.Tensor | None = None
    hidden_states: dict[int, torch.Tensor] | None = None


class OmniEngineCoreOutputs(EngineCoreOutputs, array_like=True, omit_defaults=True, gc=False):
    """vLLM's engine outputs whose elements are ``OmniEngineCoreOutput``."""

    outputs: list[OmniEngineCoreOutput] = []


def swap_engine_core_outputs(module) -> None:
    """Make ``vllm.v1.engine`` hand out the subclasses (right after it executes, before any import)."""
    module.EngineCoreOutput = OmniEngineCoreOutput
    module.EngineCoreOutputs = OmniEngineCoreOutputs
