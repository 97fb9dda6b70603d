"""``EngineCoreOutput(s)`` with a trailing ``mm_embedding`` field (swapped into ``vllm.v1.engine``).

The tensor crosses EngineCore -> frontend through vLLM's own ``MsgpackEncoder``/``MsgpackDecoder`` as an
out-of-band buffer (no pickle, no copy into the message). ``omit_defaults`` keeps outputs without an
embedding byte-identical to stock vLLM's, and a decoder built for the stock class drops the field.
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
    """vLLM's per-request engine output plus the request's multimodal embeddings (sent once)."""

    mm_embedding: MMEmbeddingOutput | None = None


class OmniEngineCoreOutputs(EngineCoreOutputs, array_like=True, omit_defaults=True, gc=False):
    """vLLM's engine outputs whose elements are ``OmniEngineCoreOutput``."""

    outputs: list[OmniEngineCoreOutput] = []


def swap_engine_core_outputs(module) -> None:
    """Make ``vllm.v1.engine`` hand out the subclasses (right after it executes, before any import)."""
    module.EngineCoreOutput = OmniEngineCoreOutput
    module.EngineCoreOutputs = OmniEngineCoreOutputs
