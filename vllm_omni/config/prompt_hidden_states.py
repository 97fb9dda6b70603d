"""Settings of prompt hidden-state return: the engine's (fixed at load) and each request's opt-in.

The engine settings ride in ``vllm_config.additional_config["omni_prompt_hidden_states"]``: that dict
enters ``VllmConfig.compute_hash``, so torch.compile caches of engines that return another layer (a
different graph output) are kept apart, and it reaches the EngineCore and workers with the config.
A request opts in with ``SamplingParams(extra_args={"prompt_hidden_states": True})`` (its prompt's
rows) or ``{"prompt_hidden_states": "all"}`` (the prompt's rows, then those of every generated token fed
back to the model, delivered when the request finishes).

Layers use transformers' ``output_hidden_states`` indexing: for a model of ``L`` decoder layers,
``0`` = embeddings, ``k`` (1..L-1) = output of decoder layer ``k-1``, ``L`` (= ``-1``) = the final
(post-norm) hidden states; negative indices count from the end.
"""

from typing import Any

from vllm.config.utils import config

ADDITIONAL_CONFIG_KEY = "omni_prompt_hidden_states"
EXTRA_ARGS_KEY = "prompt_hidden_states"
PROMPT_ROWS = "prompt"  # request mode of extra_args value True: the prompt's rows
ALL_ROWS = "all"  # extra_args value (and request mode): prompt rows, then every generated token fed back
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

    prompt_hidden_states_layer: int | list[int] = -1
    """Which hidden states to return, in transformers' `output_hidden_states` indexing: `-1` (the final,
    post-norm hidden states), `-2` (the input of the last decoder layer), `0` (the embeddings), any
    of `-(L+1)..L` for a model of `L` layers. Fixed when the engine loads (it shapes the compiled
    graph); layers other than the last need a model with vLLM's EAGLE-3 interface. A list (several
    values on the command line) returns each of those layers in `CompletionOutput.hidden_states`, a
    dict keyed by the layers as given."""


def to_additional_config(additional_config: dict[str, Any] | None, layer: int | list[int]) -> dict[str, Any]:
    """A copy of ``additional_config`` that turns the feature on for ``layer`` (one or a list)."""
    if isinstance(layer, (list, tuple)):
        if not layer or not all(_is_int(value) for value in layer) or len(set(layer)) < len(layer):
            raise ValueError(
                f"prompt_hidden_states_layer must be an integer or a non-empty list of distinct integers, "
                f"got {layer!r}"
            )
        layer = list(layer)
    elif not _is_int(layer):
        raise ValueError(f"prompt_hidden_states_layer must be an integer, got {layer!r}")
    return {**(additional_config or {}), ADDITIONAL_CONFIG_KEY: {"layer": layer}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def configured_layer(vllm_config) -> int | list[int] | None:
    """The requested layer or list of layers (transformers indexing) when the engine returns hidden
    states."""
    settings = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return None if settings is None else settings["layer"]


def layer_tuple(layer: int | list[int]) -> tuple[int, ...]:
    """The configured layer(s) as a tuple."""
    return (layer,) if isinstance(layer, int) else tuple(layer)


def aux_layer_indices(layer: int | list[int], num_layers: int) -> tuple[int | None, ...]:
    """``aux_layer_index`` of each configured layer; ``ValueError`` when two name the same layer."""
    layers = layer_tuple(layer)
    normalized = [value % (num_layers + 1) for value in layers]
    indices = tuple(aux_layer_index(value, num_layers) for value in layers)
    if len(set(normalized)) < len(layers):
        raise ValueError(
            f"prompt_hidden_states_layer={layer!r} names a layer twice for a model with {num_layers} layers"
        )
    return indices


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
    aux_indices = aux_layer_indices(layer, model_config.get_total_num_hidden_layers())
    speculative = vllm_config.speculative_config
    uses_aux = any(index is not None for index in aux_indices)
    if uses_aux and speculative is not None and speculative.method in _AUX_SPEC_METHODS:
        raise ValueError(
            f"prompt_hidden_states_layer={layer} needs the model's auxiliary hidden-state outputs, which "
            f"speculative method {speculative.method!r} already uses; use layer -1 or another method"
        )


def requested(extra_args: dict[str, Any] | None) -> bool:
    """Whether a request's ``extra_args`` ask for hidden states (validated)."""
    return request_mode(extra_args) is not None


def request_mode(extra_args: dict[str, Any] | None) -> str | None:
    """``PROMPT_ROWS`` or ``ALL_ROWS`` when a request asks for hidden states, else ``None`` (validated)."""
    value = (extra_args or {}).get(EXTRA_ARGS_KEY, False)
    if isinstance(value, str) and value == ALL_ROWS:
        return ALL_ROWS
    if not isinstance(value, bool):
        raise ValueError(
            f"extra_args['{EXTRA_ARGS_KEY}'] must be true or false, got {value!r}; or '{ALL_ROWS}' for the "
            "rows of the generated tokens too"
        )
    return PROMPT_ROWS if value else None


def returns_dict(layer: int | list[int], mode: str) -> bool:
    """Whether a request of ``mode`` on an engine configured with ``layer`` gets
    ``CompletionOutput.hidden_states`` (a dict per layer) rather than ``prompt_hidden_states``."""
    return mode == ALL_ROWS or not isinstance(layer, int)


def check_request(params) -> None:
    """Validate a ``SamplingParams``' hidden-state option: its value, and no stop strings with 'all'."""
    if request_mode(params.extra_args) == ALL_ROWS and params.stop:
        raise ValueError(
            f"extra_args['{EXTRA_ARGS_KEY}']='{ALL_ROWS}' does not support stop strings (stop="
            f"{params.stop!r}): the frontend ends such a request after the engine sent its last output, "
            "so its rows would never arrive; use stop_token_ids"
        )
