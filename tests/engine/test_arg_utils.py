"""``enable_return_mm_embedding`` as an engine argument, a CLI flag and a config field."""

import subprocess
import sys
from pathlib import Path

from vllm.config.multimodal import MultiModalConfig
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser


def test_engine_args_take_it_and_default_off():
    assert EngineArgs().enable_return_mm_embedding is False
    assert EngineArgs(enable_return_mm_embedding=True).enable_return_mm_embedding is True
    assert AsyncEngineArgs(enable_return_mm_embedding=True).enable_return_mm_embedding is True


def test_cli_flag_parses_into_async_engine_args():
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = [a for a in parser._actions if "--enable-return-mm-embedding" in a.option_strings]
    assert len(flags) == 1
    args = parser.parse_args(["--enable-return-mm-embedding"])
    assert AsyncEngineArgs.from_cli_args(args).enable_return_mm_embedding is True
    assert AsyncEngineArgs.from_cli_args(parser.parse_args([])).enable_return_mm_embedding is False


def test_model_config_carries_it_for_multimodal_models_only(llava_path, qwen3_path):
    config = EngineArgs(model=llava_path, enable_return_mm_embedding=True).create_model_config()
    assert isinstance(config.multimodal_config, MultiModalConfig)
    assert config.multimodal_config.enable_return_mm_embedding is True
    assert (
        EngineArgs(model=llava_path).create_model_config().multimodal_config.enable_return_mm_embedding
        is False
    )
    text_only = EngineArgs(model=qwen3_path, enable_return_mm_embedding=True).create_model_config()
    assert text_only.multimodal_config is None


def test_vllm_serve_help_documents_the_flag():
    vllm_cli = Path(sys.executable).parent / "vllm"
    result = subprocess.run(
        [str(vllm_cli), "serve", "--help=MultiModalConfig"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    assert "--enable-return-mm-embedding" in text
    assert "every request's outputs carry the embeddings the multimodal encoder produced" in text
