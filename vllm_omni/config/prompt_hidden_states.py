"""Settings of prompt hidden-state return: the engine's (fixed at load) and each request's opt-in.

The engine settings ride in ``vllm_config.additional_config["omni_prompt_hidden_states"]``: that dict
enters ``VllmConfig.compute_hash``, so torch.compile caches of engines that return another layer (a
different graph output) are kept apart, and it reaches the EngineCore and workers with the config.
A request opts in with ``SamplingParams(extra_args={"prompt_hidden_states": True})``.

Layers use transformers' ``output_hidden_states`` indexing: for a model of ``L`` decoder layers,
``0`` = embeddings, ``k`` (1..L-1) = output of decoder layer ``k-1``, ``L`` (= ``-1``) = the final
(post-norm) hidden states; negative indices count from the end.
"""

from typing import Any

from vllm.config.utils import config

ADDITIONAL_CONFIG_KEY = "omni_prompt_hidden_states"
EXTRA_ARGS_KEY = "prompt_hidden_states"
# Speculative methods whose drafter owns the model's auxiliary hidden-state outputs.
_AUX_SPEC_METHODS = ("eagle3", "extract_hidden_states", "dflash")


@config
class PromptHiddenStatesConfig:
    """Engine arguments of prompt hidden-state return (source of the CLI flags and their help)."""

    return_prompt_hidden_states: bool = False
    """If `True`, requests that opt in (`SamplingParams(extra_args={"prompt_hidden_states": True})`)
    get their prompt's hidden states back (`CompletionOutput.prompt_hidden_states`, a CPU tensor
    `(num_prompt_tokens, hidden)` in the model dtype). Opted-in requests skip prefix-cache reads;
    others are unaffected."""

    prompt_hidden_states_layer: int = -1
    """Which hidden states to return, in transformers' `output_hidden_states` indexing: `-1` (the final,
    post-norm hidden states), `-2` (the input of the last decoder layer), `0` (the embeddings), any
    of `-(L+1)..L` for a model of `L` layers. Fixed when the engine loads (it shapes the compiled
    graph); layers other than the last need a model with vLLM's EAGLE-3 interface."""


def to_additional_config(additional_config: dict[str, Any] | None, layer: int) -> dict[str, Any]:
    """A copy of ``additional_config`` that turns the feature on for ``layer``."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"prompt_hidden_states_layer must be an integer, got {layer!r}")
    return {**(additional_config or {}), ADDITIONAL_CONFIG_KEY: {"layer": layer}}


def configured_layer(vllm_config) -> int | None:
    """The requested layer (transformers indexing) when the engine returns prompt hidden states."""
    settings = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return None if settings is None else settings["layer"]


def aux_layer_index(layer: int, num_layers: int) -> int | None:
    """vLLM's auxiliary hidden-state index for ``layer``, or ``None`` for the model's final output.

    vLLM's aux index ``k`` (``k < L``) records the residual stream entering decoder layer ``k``, which
    is transformers' ``hidden_states[k]``; transformers' last entry is the post-norm output, which is
    the model's main output.
    """
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"prompt_hidden_states_layer must be in -{num_layers + 1}..{num_layers} for a model with "
            f"{num_layers} layers, got {layer}"
        )
    index = layer % (num_layers + 1)
    return None if index == num_layers else index


def check_engine_config(vllm_config) -> None:
    """Raise ``ValueError`` for setups the feature does not support (checked when the engine is built)."""
    layer = configured_layer(vllm_config)
    if layer is None:
        return
    model_config = vllm_config.model_config
    if model_config.runner_type != "generate":
        raise ValueError(
            f"return_prompt_hidden_states needs a generating model (runner 'generate'), "
            f"got runner {model_config.runner_type!r}"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "return_prompt_hidden_states does not support pipeline parallelism "
            f"(pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size}); use 1"
        )
    if vllm_config.kv_transfer_config is not None:
        raise ValueError(
            "return_prompt_hidden_states does not support a KV connector (kv_transfer_config): prompt "
            "tokens loaded from elsewhere are never computed here, so their hidden states do not exist"
        )
    aux_index = aux_layer_index(layer, model_config.get_total_num_hidden_layers())
    speculative = vllm_config.speculative_config
    if aux_index is not None and speculative is not None and speculative.method in _AUX_SPEC_METHODS:
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs the model's auxiliary hidden-state outputs, which "
            f"speculative method {speculative.method!r} already uses; use layer -1 or another method"
        )


def requested(extra_args: dict[str, Any] | None) -> bool:
    """Whether a request's ``extra_args`` ask for prompt hidden states (validated)."""
    value = (extra_args or {}).get(EXTRA_ARGS_KEY, False)
    if not isinstance(value, bool):
        raise ValueError(f"extra_args['{EXTRA_ARGS_KEY}'] must be true or false, got {value!r}")
    return value
