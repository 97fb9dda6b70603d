"""vLLM-Omni: vLLM 0.32 with omni patches.

This module stays light on purpose: the start-up hook imports ``vllm_omni.patch.startup`` in every
Python process of the environment, which imports this package first. The public API below is imported
on first access.
"""

import importlib

from vllm_omni.version import __version__

_LAZY = {
    "OmniLLM": "vllm_omni.entrypoints.omni_llm",
    "AsyncOmniLLM": "vllm_omni.entrypoints.async_omni_llm",
    "OmniStageConfig": "vllm_omni.config.stage",
    "OmniRequestOutput": "vllm_omni.pipeline.outputs",
    "StageInput": "vllm_omni.pipeline.stage_input",
    "register_stage_input": "vllm_omni.pipeline.stage_input",
    "create_ar_stage_config": "vllm_omni.config.stage",
    "create_dit_stage_config": "vllm_omni.config.stage",
    "MultimodalQwen3Pipeline": "vllm_omni.entrypoints.multimodal_qwen3_pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm_omni' has no attribute {name!r}")
