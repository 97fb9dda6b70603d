"""MultimodalQwen3Pipeline: text plus named raw embeddings in, text out, on a vLLM engine.

    pipeline = MultimodalQwen3Pipeline("path/to/multimodal-qwen3", device="cpu")
    embeddings = {"audio": [torch.randn(768)], "vision": [torch.randn(4, 512)]}
    pipeline.generate(
        {"text": "Describe this scene.", "multimodal_data": {"multimodal_embeddings": embeddings}},
        max_tokens=100,
    )

It is a thin layer over ``vllm.LLM``: the same folder also works with ``LLM(model=...)`` and ``vllm serve``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INPUT_KEYS = ("text", "multimodal_data")


class MultimodalQwen3Pipeline:
    """Generate text from ``{"text": ..., "multimodal_data": {"multimodal_embeddings": {...}}}`` inputs.

    Args:
        model_name: a multimodal Qwen3 folder (see ``vllm_omni.transformers_utils.multimodal_qwen3_builder``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; must be the device of the installed vLLM build.
        **engine_args: any ``vllm.LLM`` / ``EngineArgs`` argument (``dtype``, ``max_model_len``...).
    """

    def __init__(self, model_name: str, device: str = "auto", **engine_args: Any) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device != "auto" and device != current_platform.device_type:
            raise ValueError(
                f"device {device!r} is not what this vLLM build runs on ({current_platform.device_type!r}); "
                "install the matching vLLM wheel or pass device='auto'"
            )
        self.llm = LLM(model=model_name, **engine_args)

    def generate(
        self, input_data: Mapping[str, Any] | list[Mapping[str, Any]], max_tokens: int = 256, **sampling: Any
    ) -> str | list[str]:
        """Generated text of one input (a string) or of a list of inputs (a list, batched together).

        ``sampling``: any ``vllm.SamplingParams`` field (``temperature``, ``top_p``, ``seed``...).
        """
        from vllm import SamplingParams

        single = isinstance(input_data, Mapping)
        inputs = [input_data] if single else list(input_data)
        params = SamplingParams(max_tokens=max_tokens, **sampling)
        outputs = self.llm.generate([to_vllm_prompt(item) for item in inputs], params, use_tqdm=False)
        texts = [output.outputs[0].text for output in outputs]
        return texts[0] if single else texts


def to_vllm_prompt(item: Mapping[str, Any]) -> dict[str, Any]:
    """The vLLM prompt dict of one pipeline input."""
    if not isinstance(item, Mapping):
        raise ValueError(f"each input must be a dict with keys {INPUT_KEYS}, got {type(item).__name__}")
    unknown = sorted(set(item) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"unknown input key(s) {unknown}; allowed: {', '.join(INPUT_KEYS)}")
    if not isinstance(item.get("text"), str):
        raise ValueError("input 'text' must be a string")
    prompt: dict[str, Any] = {"prompt": item["text"]}
    if item.get("multimodal_data"):
        prompt["multi_modal_data"] = dict(item["multimodal_data"])
    return prompt
