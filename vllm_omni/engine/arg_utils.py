"""``EngineArgs`` / ``AsyncEngineArgs`` with vllm-omni's arguments (swapped into ``vllm.engine.arg_utils``).

``LLM(..., enable_return_mm_embedding=True)``, ``EngineArgs(enable_return_mm_embedding=True)`` and
``vllm serve ... --enable-return-mm-embedding`` all land in
``vllm_config.model_config.multimodal_config.enable_return_mm_embedding``.
"""

import argparse
from dataclasses import dataclass

from vllm.config import ModelConfig
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs, get_kwargs

from vllm_omni.config.multimodal import OmniMultiModalConfig

_MM_GROUP_TITLE = "MultiModalConfig"


@dataclass
class OmniEngineArgs(EngineArgs):
    """vLLM's engine arguments plus ``enable_return_mm_embedding``."""

    enable_return_mm_embedding: bool = OmniMultiModalConfig.enable_return_mm_embedding

    @staticmethod
    def add_cli_args(parser):
        parser = EngineArgs.add_cli_args(parser)
        add_omni_cli_args(parser)
        return parser

    def create_model_config(self) -> ModelConfig:
        model_config = super().create_model_config()
        if model_config.multimodal_config is not None:
            model_config.multimodal_config.enable_return_mm_embedding = self.enable_return_mm_embedding
        return model_config


@dataclass
class OmniAsyncEngineArgs(AsyncEngineArgs, OmniEngineArgs):
    """vLLM's async engine arguments plus vllm-omni's."""


def add_omni_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--enable-return-mm-embedding`` to the parser's MultiModalConfig group."""
    groups = [g for g in parser._action_groups if g.title == _MM_GROUP_TITLE]
    group = groups[0] if groups else parser
    kwargs = get_kwargs(OmniMultiModalConfig)["enable_return_mm_embedding"]
    group.add_argument("--enable-return-mm-embedding", **kwargs)


def swap_engine_args(module) -> None:
    """Make ``vllm.engine.arg_utils`` hand out the subclasses (before ``vllm.LLM`` imports them)."""
    module.EngineArgs = OmniEngineArgs
    module.AsyncEngineArgs = OmniAsyncEngineArgs
