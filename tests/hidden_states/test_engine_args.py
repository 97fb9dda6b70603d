"""``return_prompt_hidden_states`` / ``prompt_hidden_states_layer`` as engine arguments and CLI flags."""

import subprocess
import sys
from pathlib import Path

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser


def test_engine_args_take_them_with_defaults_off_and_last_layer():
    assert EngineArgs().return_prompt_hidden_states is False
    assert EngineArgs().prompt_hidden_states_layer == -1
    args = AsyncEngineArgs(return_prompt_hidden_states=True, prompt_hidden_states_layer=-2)
    assert (args.return_prompt_hidden_states, args.prompt_hidden_states_layer) == (True, -2)


def test_cli_flags_parse_into_async_engine_args():
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--return-prompt-hidden-states", "--prompt-hidden-states-layer", "-2"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert (engine_args.return_prompt_hidden_states, engine_args.prompt_hidden_states_layer) == (True, -2)
    several = parser.parse_args(["--return-prompt-hidden-states", "--prompt-hidden-states-layer", "0", "-1"])
    assert AsyncEngineArgs.from_cli_args(several).prompt_hidden_states_layer == [0, -1]
    default = AsyncEngineArgs.from_cli_args(parser.parse_args([]))
    assert (default.return_prompt_hidden_states, default.prompt_hidden_states_layer) == (False, -1)


def test_config_carries_the_layer_only_when_on(qwen3_path):
    on = EngineArgs(model=qwen3_path, return_prompt_hidden_states=True, prompt_hidden_states_layer=0)
    on_config = on.create_engine_config()
    assert on_config.additional_config == {"omni_prompt_hidden_states": {"layer": 0}}
    off_config = EngineArgs(model=qwen3_path).create_engine_config()
    assert "omni_prompt_hidden_states" not in off_config.additional_config
    last = EngineArgs(model=qwen3_path, return_prompt_hidden_states=True).create_engine_config()
    several = EngineArgs(
        model=qwen3_path, return_prompt_hidden_states=True, prompt_hidden_states_layer=[0, -1]
    )
    several_config = several.create_engine_config()
    assert several_config.additional_config == {"omni_prompt_hidden_states": {"layer": [0, -1]}}
    # Another layer is another compiled graph: the settings enter the compile-cache hash.
    hashes = {c.compute_hash() for c in (on_config, off_config, last, several_config)}
    assert len(hashes) == 4


def test_vllm_serve_help_documents_the_flags():
    vllm_cli = Path(sys.executable).parent / "vllm"
    result = subprocess.run(
        [str(vllm_cli), "serve", "--help=PromptHiddenStatesConfig"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    assert "--return-prompt-hidden-states" in text and "--prompt-hidden-states-layer" in text
    assert "in transformers' `output_hidden_states` indexing" in text
