"""Multimodal Qwen3 in plain PyTorch + transformers: for training the projectors and as the test reference.

``MultimodalQwen3HF.from_pretrained(folder)`` loads the folder's Qwen3 with transformers and its projectors;
``inputs_embeds`` builds what the LM sees: the text embeddings with each item's projected vectors in the
place of its placeholder tokens. The vLLM model (``vllm_omni.model_executor.models.multimodal_qwen3``)
serves the same folder; its greedy tokens equal this module's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vllm_omni.config.multimodal_qwen3 import ModalitySpec, modalities_from_config
from vllm_omni.model_executor.models.projector import MultiModalProjector
from vllm_omni.transformers_utils.multimodal_qwen3_builder import PREFIX, PROJECTORS_FILE

Items = dict[str, list[torch.Tensor]]
"""Modality name -> items; a 1-D item is one position, a 2-D ``(n, width)`` item n positions."""


class MultimodalQwen3HF(nn.Module):
    """A transformers ``Qwen3ForCausalLM`` plus one ``MultiModalProjector`` per modality."""

    def __init__(self, lm: nn.Module, specs: dict[str, ModalitySpec]) -> None:
        super().__init__()
        self.lm = lm
        self.specs = specs
        hidden = lm.config.hidden_size
        self.multi_modal_projectors = nn.ModuleDict(
            {name: MultiModalProjector(s.input_width, s.hidden_size, hidden) for name, s in specs.items()}
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> MultimodalQwen3HF:
        from transformers import Qwen3ForCausalLM

        lm = Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype)
        model = cls(lm, modalities_from_config(lm.config)).to(dtype)
        weights = load_file(str(Path(folder) / PROJECTORS_FILE))
        model.load_projectors(weights)
        return model

    def load_projectors(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the projectors from checkpoint-named weights (all of them must be there)."""
        own = {k.removeprefix(f"{PREFIX}."): v for k, v in weights.items() if k.startswith(f"{PREFIX}.")}
        self.multi_modal_projectors.load_state_dict(own)

    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """The projectors under their checkpoint names (what the folder builder's ``--projectors`` reads)."""
        state = self.multi_modal_projectors.state_dict()
        return {f"{PREFIX}.{k}": v.detach().contiguous() for k, v in state.items()}

    def expand_placeholders(self, token_ids: list[int], items: Items) -> list[int]:
        """``token_ids`` with each placeholder repeated once per position of its item.

        A modality whose placeholder is absent from the prompt has its items put first (modalities in the
        order of ``items``, items in list order); otherwise placeholders and items must pair up one to one.
        """
        prefix = []
        for name, group in items.items():
            spec = self.specs[name]
            count = token_ids.count(spec.placeholder_id)
            if count == 0:
                prefix += [spec.placeholder_id] * len(group)
            elif count != len(group):
                raise ValueError(f"{count} {spec.placeholder} placeholders for {len(group)} items")
        by_id = {s.placeholder_id: name for name, s in self.specs.items()}
        remaining = {name: list(group) for name, group in items.items()}
        out = []
        for token in prefix + list(token_ids):
            if token in by_id:
                item = remaining[by_id[token]].pop(0)
                out.extend([token] * (1 if item.dim() == 1 else item.shape[0]))
            else:
                out.append(token)
        return out

    def inputs_embeds(self, expanded_ids: list[int], items: Items) -> torch.Tensor:
        """``(len(expanded_ids), hidden)``: the text embeddings, projected items at their placeholders."""
        ids = torch.tensor(expanded_ids)
        embeds = self.lm.get_input_embeddings()(ids)
        for name, group in items.items():
            positions = (ids == self.specs[name].placeholder_id).nonzero().flatten()
            vectors = torch.cat([item.reshape(-1, item.shape[-1]) for item in group]).to(embeds.dtype)
            embeds = embeds.index_put((positions,), self.multi_modal_projectors[name](vectors))
        return embeds

    @torch.no_grad()
    def greedy(self, token_ids: list[int], items: Items, max_tokens: int) -> list[int]:
        """``max_tokens`` greedy tokens after a prompt (``token_ids`` as tokenized; no stop at EOS)."""
        embeds = self.inputs_embeds(self.expand_placeholders(token_ids, items), items)
        generated = []
        for _ in range(max_tokens):
            token = int(self.lm(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            generated.append(token)
            embeds = torch.cat([embeds, self.lm.get_input_embeddings()(torch.tensor([token]))])
        return generated
