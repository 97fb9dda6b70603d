"""``EngineArgs`` / ``AsyncEngineArgs`` with vllm-omni's arguments (swapped into ``vllm.engine.arg_utils``).

``LLM(..., enable_return_mm_embedding=True)``, ``EngineArgs(enable_return_mm_embedding=True)`` and
``vllm serve ... --enable-return-mm-embedding`` all land in
``vllm_config.model_config.multimodal_config.enable_return_mm_embedding``.
``LLM(..., return_prompt_hidden_states=True, prompt_hidden_states_layer=-2)`` (or a list of layers; CLI
``--return-prompt-hidden-states --prompt-hidden-states-layer -2``, or ``0 -1``) lands in
``vllm_config.additional_config["omni_prompt_hidden_states"]`` (``vllm_omni.config.prompt_hidden_states``).
With either feature on, ``create_engine_config`` also names the EngineCore scheduler that collects their
per-request data (``scheduler_config.scheduler_cls``, see ``vllm_omni.v1.core.sched.output_collectors``).
"""

import argparse
from dataclasses import dataclass

from vllm.config import ModelConfig, VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs, get_kwargs

from vllm_omni.config import prompt_hidden_states as phs
from vllm_omni.config.multimodal import OmniMultiModalConfig

_MM_GROUP_TITLE = "MultiModalConfig"
_PHS_GROUP_TITLE = "PromptHiddenStatesConfig"


@dataclass
class OmniEngineArgs(EngineArgs):
    """vLLM's engine arguments plus vllm-omni's."""

    enable_return_mm_embedding: bool = OmniMultiModalConfig.enable_return_mm_embedding
    """Return the prompt's multimodal encoder embeddings (see ``OmniMultiModalConfig``)."""
    return_prompt_hidden_states: bool = phs.PromptHiddenStatesConfig.return_prompt_hidden_states
    """Return the prompt's hidden states to requests that opt in (see ``PromptHiddenStatesConfig``)."""
    prompt_hidden_states_layer: int | list[int] = phs.PromptHiddenStatesConfig.prompt_hidden_states_layer
    """Layer(s) of those hidden states, transformers' ``output_hidden_states`` indexing (-1 = last)."""

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

    def create_engine_config(self, usage_context=None, headless: bool = False) -> VllmConfig:
        if self.return_prompt_hidden_states:
            # Before VllmConfig exists: additional_config enters its compile hash.
            self.additional_config = phs.to_additional_config(
                self.additional_config, self.prompt_hidden_states_layer
            )
        elif self.prompt_hidden_states_layer != phs.PromptHiddenStatesConfig.prompt_hidden_states_layer:
            raise ValueError(
                f"prompt_hidden_states_layer={self.prompt_hidden_states_layer} has no effect without "
                "return_prompt_hidden_states=True (--return-prompt-hidden-states)"
            )
        vllm_config = super().create_engine_config(usage_context, headless)
        phs.check_engine_config(vllm_config)
        use_per_request_outputs(vllm_config)
        return vllm_config


@dataclass
class OmniAsyncEngineArgs(AsyncEngineArgs, OmniEngineArgs):
    """vLLM's async engine arguments plus vllm-omni's."""


def use_per_request_outputs(vllm_config: VllmConfig) -> None:
    """For engines with a feature that sends per-request data from the workers: check that the workers
    run the model runner the captures hook, and pick the EngineCore scheduler that collects the data
    (``scheduler_cls``). Engines without such a feature keep vLLM's scheduler."""
    # Imported here: the scheduler modules are needed only when the engine is built.
    from vllm_omni.v1.core.sched.output_collectors import enabled_arguments, use_collecting_scheduler
    from vllm_omni.v1.worker.runner_output import check_model_runner

    arguments = enabled_arguments(vllm_config)
    if arguments:
        check_model_runner(vllm_config, arguments)
        use_collecting_scheduler(vllm_config, arguments)


def add_omni_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--enable-return-mm-embedding`` to the MultiModalConfig group and the prompt hidden-state
    flags to their own group."""
    groups = [g for g in parser._action_groups if g.title == _MM_GROUP_TITLE]
    group = groups[0] if groups else parser
    kwargs = get_kwargs(OmniMultiModalConfig)["enable_return_mm_embedding"]
    group.add_argument("--enable-return-mm-embedding", **kwargs)

    phs_group = parser.add_argument_group(_PHS_GROUP_TITLE, phs.PromptHiddenStatesConfig.__doc__)
    phs_kwargs = get_kwargs(phs.PromptHiddenStatesConfig)
    phs_group.add_argument("--return-prompt-hidden-states", **phs_kwargs["return_prompt_hidden_states"])
    phs_group.add_argument(
        "--prompt-hidden-states-layer", **phs_kwargs["prompt_hidden_states_layer"], action=_OneOrList
    )


class _OneOrList(argparse.Action):
    """Store one value as itself and several as a list (``--prompt-hidden-states-layer -2`` or ``0 -1``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


def swap_engine_args(module) -> None:
    """Make ``vllm.engine.arg_utils`` hand out the subclasses (before ``vllm.LLM`` imports them)."""
    module.EngineArgs = OmniEngineArgs
    module.AsyncEngineArgs = OmniAsyncEngineArgs
