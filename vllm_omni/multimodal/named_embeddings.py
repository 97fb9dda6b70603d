"""vLLM input processing for named raw embeddings (multimodal Qwen3).

A request carries ``multi_modal_data={"multimodal_embeddings": {"audio": [t1, t2], "vision": [t3]}}``
(or the same names as top-level keys). Each name is a vLLM modality of its own, so its items pair with its
own placeholder token in prompt order. A 1-D item ``(width,)`` is one position, a 2-D item ``(n, width)``
n positions: its placeholder token is repeated n times and the projector's n output rows take those
positions. A modality whose placeholder is absent from the prompt has its items put before the text, in
the order the request lists the modalities, items in list order.

Items skip any Hugging Face processor: the raw tensors pass through to ``embed_multimodal``. vLLM hashes
their bytes, dtype and shape, so identical embeddings share the prefix and encoder caches and different
ones never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from vllm_omni.config.multimodal_qwen3 import ModalitySpec, modalities_from_config

DATA_KEY = "multimodal_embeddings"
"""Key of ``multi_modal_data`` holding ``{modality name: [tensors]}``."""
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def field_key(modality: str) -> str:
    """Keyword under which ``embed_multimodal`` receives a modality's raw tensors."""
    return f"{modality}__raw_embeddings"


class NamedEmbeddingItems(ModalityDataItems[list[torch.Tensor], torch.Tensor]):
    """The items of one named modality: ``(n, width)`` tensors passed through to the model."""

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> torch.Tensor:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {field_key(self.modality): list(self.data)} if self.data else {}


class NamedEmbeddingsParser(MultiModalDataParser):
    """Parses and validates the items of each named modality (names, widths, dtypes, finite values)."""

    def __init__(self, specs: dict[str, ModalitySpec]) -> None:
        super().__init__()
        self.specs = specs

    def parse_mm_data(self, mm_data: Mapping[str, Any]) -> MultiModalDataItems:
        items = MultiModalDataItems()
        for key, value in mm_data.items():
            if key != DATA_KEY:
                items[key] = self._items(key, value)
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"multi_modal_data[{DATA_KEY!r}] must be a dict: modality name -> tensors")
            # vLLM checks every top-level key of multi_modal_data against the parsed items: keep this one.
            items[DATA_KEY] = NamedEmbeddingItems([], DATA_KEY)
            for name, group in value.items():
                items[name] = self._items(name, group)
        return items

    def _items(self, name: str, group: Any) -> NamedEmbeddingItems:
        if name not in self.specs:
            raise ValueError(
                f"{DATA_KEY}: unknown modality {name!r}; this model takes {', '.join(sorted(self.specs))}"
            )
        if isinstance(group, (torch.Tensor, np.ndarray)):
            group = [group]
        if not isinstance(group, (list, tuple)) or not group:
            raise ValueError(f"{DATA_KEY}[{name!r}] must be a non-empty list of tensors")
        return NamedEmbeddingItems([self._item(name, i, t) for i, t in enumerate(group)], name)

    def _item(self, name: str, index: int, item: Any) -> torch.Tensor:
        where, width = f"{DATA_KEY}[{name!r}][{index}]", self.specs[name].input_width
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, torch.Tensor):
            raise ValueError(f"{where} must be a torch.Tensor or numpy array, got {type(item).__name__}")
        if item.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where} has dtype {item.dtype}; allowed: float32, float16, bfloat16, float64")
        if item.dim() == 1:
            item = item[None]
        if item.dim() != 2 or item.shape[0] == 0 or item.shape[1] != width:
            raise ValueError(
                f"{where} has shape {tuple(item.shape)}; allowed: ({width},) or (n, {width}) with n >= 1"
            )
        if not torch.isfinite(item).all():
            raise ValueError(f"{where} contains NaN or Inf")
        return item.detach().cpu().contiguous()


class NamedEmbeddingsProcessingInfo(BaseProcessingInfo):
    """The model's modalities, from its config; any number of items per prompt."""

    @cached_property
    def specs(self) -> dict[str, ModalitySpec]:
        return modalities_from_config(self.get_hf_config())

    def get_data_parser(self) -> MultiModalDataParser:
        return NamedEmbeddingsParser(self.specs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return dict.fromkeys(self.specs)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return dict.fromkeys(mm_counts, seq_len)  # one item may fill the whole context


class NamedEmbeddingsDummyInputsBuilder(BaseDummyInputsBuilder[NamedEmbeddingsProcessingInfo]):
    """Zero embeddings as long as the context, for vLLM's warm-up and profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        specs = self.info.specs
        return "".join(specs[name].placeholder * count for name, count in mm_counts.items())

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None) -> dict:
        specs = self.info.specs
        return {
            name: [torch.zeros(seq_len, specs[name].input_width)] * n for name, n in mm_counts.items() if n
        }


class NamedEmbeddingsProcessor(BaseMultiModalProcessor[NamedEmbeddingsProcessingInfo]):
    """Pairs items with placeholders (or puts them first) and expands each placeholder to its item's rows."""

    def apply(self, inputs, timing_ctx):
        specs, items = self.info.specs, inputs.mm_data_items
        counts = {name: inputs.prompt.count(spec.placeholder_id) for name, spec in specs.items()}
        for name, count in counts.items():
            n_items = items[name].get_count() if name in items else 0
            if count and count != n_items:
                raise ValueError(
                    f"the prompt has {count} {specs[name].placeholder} placeholder(s) but {DATA_KEY} has "
                    f"{n_items} {name!r} item(s); give one item per placeholder, or no placeholder to put "
                    f"the items before the text"
                )
        prefix = [specs[name].placeholder_id for name in items if name in specs and not counts[name]
                  for _ in range(items[name].get_count())]  # fmt: skip
        if prefix:
            inputs = replace(inputs, prompt=prefix + list(inputs.prompt))
        return super().apply(inputs, timing_ctx)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {field_key(name): MultiModalFieldConfig.batched(name) for name in self.info.specs}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> list[PromptReplacement]:
        updates = []
        for name, spec in self.info.specs.items():
            if name not in out_mm_kwargs:
                continue

            def rows(index: int, name=name, spec=spec) -> list[int]:
                return [spec.placeholder_id] * out_mm_kwargs[name][index][field_key(name)].data.shape[0]

            updates.append(PromptReplacement(modality=name, target=[spec.placeholder_id], replacement=rows))
        return updates
