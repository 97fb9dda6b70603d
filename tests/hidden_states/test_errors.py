"""Unsupported setups and bad requests fail with errors that say what to change."""

import re
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs

from tests.hidden_states.conftest import opted_in
from vllm_omni.v1.worker.prompt_hidden_states_capture import PromptHiddenStatesCapturer, enable_aux_output


@pytest.mark.parametrize(
    ("engine_args", "message"),
    [
        (
            {"prompt_hidden_states_layer": -4},
            "prompt_hidden_states_layer must be in -3..2 for a model with 2 layers, got -4",
        ),
        (
            {"prompt_hidden_states_layer": 3},
            "prompt_hidden_states_layer must be in -3..2 for a model with 2 layers, got 3",
        ),
        ({"prompt_hidden_states_layer": "-2"}, "prompt_hidden_states_layer must be an integer, got '-2'"),
        (
            {"return_prompt_hidden_states": False, "prompt_hidden_states_layer": 0},
            "prompt_hidden_states_layer=0 has no effect without return_prompt_hidden_states=True",
        ),
        ({"pipeline_parallel_size": 2}, "return_prompt_hidden_states does not support pipeline parallelism"),
        (
            {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
            "return_prompt_hidden_states does not support a KV connector (kv_transfer_config)",
        ),
        (
            {"runner": "pooling"},
            "return_prompt_hidden_states needs a generating model (runner 'generate'), got runner 'pooling'",
        ),
        (
            {"speculative_config": {"method": "extract_hidden_states", "num_speculative_tokens": 1}},
            "prompt_hidden_states_layer=-2 needs the model's auxiliary hidden-state outputs, which "
            "speculative method 'extract_hidden_states' already uses",
        ),
    ],
)
def test_unsupported_engine_setups_are_refused_when_the_config_is_built(qwen3_path, engine_args, message):
    engine_args = {"return_prompt_hidden_states": True, "prompt_hidden_states_layer": -2, **engine_args}
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineArgs(model=qwen3_path, **engine_args).create_engine_config()


def test_the_last_layer_works_beside_speculative_aux_outputs(qwen3_path):
    speculative = {"method": "extract_hidden_states", "num_speculative_tokens": 1}
    args = EngineArgs(model=qwen3_path, return_prompt_hidden_states=True, speculative_config=speculative)
    assert args.create_engine_config().additional_config["omni_prompt_hidden_states"] == {"layer": -1}


def test_a_model_without_aux_outputs_is_refused_at_load():
    runner = SimpleNamespace(use_aux_hidden_state_outputs=False, model=torch.nn.Linear(2, 2))
    runner.get_model = lambda: runner.model
    capturer = PromptHiddenStatesCapturer(layer=-2, aux_index=1)
    with pytest.raises(
        ValueError, match="needs a model with vLLM's SupportsEagle3 interface .* Linear has none"
    ):
        enable_aux_output(runner, capturer)
    runner.use_aux_hidden_state_outputs = True  # a speculative method owns them
    with pytest.raises(ValueError, match="which speculative decoding already uses; use layer -1"):
        enable_aux_output(runner, capturer)


@pytest.mark.parametrize("value", ["yes", 1, {"layer": -2}])
def test_bad_request_option_fails_when_sampling_params_are_built(value):
    message = f"extra_args['prompt_hidden_states'] must be true or false, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(extra_args={"prompt_hidden_states": value})


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            [],
            "prompt_hidden_states_layer must be an integer or a non-empty list of distinct integers, got []",
        ),
        ([0, 0], "must be an integer or a non-empty list of distinct integers, got [0, 0]"),
        ([0, "1"], "must be an integer or a non-empty list of distinct integers, got [0, '1']"),
        ([0, 3], "prompt_hidden_states_layer must be in -3..2 for a model with 2 layers, got 3"),
        ([-1, 2], "prompt_hidden_states_layer=[-1, 2] names a layer twice for a model with 2 layers"),
    ],
)
def test_bad_layer_lists_are_refused_when_the_config_is_built(qwen3_path, layer, message):
    args = EngineArgs(model=qwen3_path, return_prompt_hidden_states=True, prompt_hidden_states_layer=layer)
    with pytest.raises(ValueError, match=re.escape(message)):
        args.create_engine_config()


def test_all_positions_with_stop_strings_are_refused_when_sampling_params_are_built():
    message = "extra_args['prompt_hidden_states']='all' does not support stop strings (stop=['.'])"
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(stop=["."], extra_args={"prompt_hidden_states": "all"})
    SamplingParams(stop_token_ids=[5], extra_args={"prompt_hidden_states": "all"})  # token ids are fine


@pytest.mark.engine
def test_asking_an_engine_without_the_feature_fails_and_it_keeps_serving(qwen3_llm):
    message = (
        "extra_args['prompt_hidden_states'] needs an engine started with return_prompt_hidden_states=True"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        qwen3_llm.generate(["Hello, world!"], opted_in())
    (output,) = qwen3_llm.generate(["Hello, world!"], SamplingParams(max_tokens=2))
    assert output.outputs[0].prompt_hidden_states is None and len(output.outputs[0].token_ids) == 2
    assert not qwen3_llm.llm_engine.output_processor.request_states
