"""``vllm serve MODEL --omni``: an omni pipeline behind an HTTP server (``OmniServeCommand``).

The pipeline comes from ``MODEL`` (a diffusers pipeline, folder or hub id: one ``dit`` stage; a vLLM model,
folder or hub id: one ``ar`` stage; a stage YAML file), from ``--stage-config FILE``, or from
``--ar-stage MODEL --dit-stage MODEL`` (the LLM rewrites the prompt, the DiT draws it). vLLM's engine flags
(``--max-model-len``, ``--dtype``, ``--revision``, ...) go to every ``ar`` stage; ``--dit-*`` flags to every
``dit`` stage (and ``--revision`` to MODEL's). ``--stage-launcher ray`` runs the stages as Ray actors on
a cluster (``--ray-address``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.stage import (
    PIPELINE_LAUNCHERS,
    OmniStageConfig,
    create_ar_stage_config,
    create_dit_stage_config,
    load_pipeline_file,
)
from vllm_omni.entrypoints.openai.text_serving import add_chat_args
from vllm_omni.pipeline.model_pipelines import is_pipeline_file, pipeline_of, stages_for_model

DESCRIPTION = """Serve an omni pipeline: OpenAI Images API (/v1/images/generations), /v1/chat/completions and
/v1/completions (pipelines from an ar stage to an ar stage), the native /generate, /health, /info,
/v1/models and /metrics (Prometheus).

  vllm serve MODEL --omni                         a diffusers pipeline or a vLLM model (folder or hub id),
                                                  or a stage YAML file
  vllm serve --omni --stage-config pipeline.yaml
  vllm serve --omni --ar-stage LLM --dit-stage DIT   the LLM rewrites each prompt, the DiT draws it

vLLM's engine arguments (ModelConfig, CacheConfig, ... groups) apply to every ar stage.
"""
SERVER_DEFAULTS = {"host": "0.0.0.0", "port": 8000}
SYSTEM_PROMPT_INPUT = "serve_system_prompt"


class OmniServeCommand:
    """The ``serve`` subcommand of ``vllm ... --omni``."""

    name = "serve"

    @staticmethod
    def subparser_init(subparsers: Any) -> argparse.ArgumentParser:
        from vllm.engine.arg_utils import AsyncEngineArgs

        parser = subparsers.add_parser(
            "serve", description=DESCRIPTION, usage="vllm serve [MODEL] --omni [options]",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        parser.add_argument(
            "model_tag", nargs="?", help="diffusers pipeline or vLLM model (folder or hub id), or stage YAML"
        )
        parser.add_argument("--omni", action="store_true", required=True, help="serve an omni pipeline")
        _add_pipeline_args(parser.add_argument_group("pipeline"))
        _add_server_args(parser.add_argument_group("server"))
        add_chat_args(
            parser.add_argument_group("chat and completions (pipelines from an ar stage to an ar stage)")
        )
        AsyncEngineArgs.add_cli_args(parser)  # its groups (ModelConfig, ...) at the top: --help lists them
        parser.set_defaults(dispatch_function=OmniServeCommand.cmd)
        return parser

    @staticmethod
    def cmd(args: argparse.Namespace) -> None:
        from vllm_omni.entrypoints.openai.api_server import run_server

        run_server(args, stages_from_args(args), launcher_from_args(args))


def _add_pipeline_args(group: Any) -> None:
    group.add_argument(
        "--stage-config", metavar="FILE", help="stage YAML file (see docs/features/omni_pipelines.md)"
    )
    group.add_argument(
        "--ar-stage", metavar="MODEL", help="the LLM of an AR -> DiT pipeline (with --dit-stage)"
    )
    group.add_argument(
        "--dit-stage", metavar="MODEL", help="the DiT of an AR -> DiT pipeline (with --ar-stage)"
    )
    group.add_argument(
        "--ar-system-prompt", metavar="TEXT",
        help="AR -> DiT: system turn of the LLM's chat template, the user's prompt as the user turn "
        "(default: the prompt goes to the LLM as it is)",
    )  # fmt: skip
    group.add_argument("--dit-steps", type=_positive_int, metavar="N", help="dit stages: denoising steps")
    group.add_argument("--dit-guidance-scale", type=float, metavar="X", help="dit stages: guidance scale")
    group.add_argument("--dit-size", type=_size, metavar="WxH", help="dit stages: default image size")
    group.add_argument(
        "--dit-compile",
        choices=["auto", "on", "off"],
        help="dit stages: compiled transformer blocks (DiTConfig.compile)",
    )
    group.add_argument(
        "--stage-launcher", choices=PIPELINE_LAUNCHERS,
        help="where the stages run: local processes, or Ray actors on a Ray cluster (default: the stage "
        "YAML's launcher, else local)",
    )  # fmt: skip
    group.add_argument(
        "--ray-address", metavar="ADDRESS",
        help="with --stage-launcher ray: the cluster to join (default: the one ray.init() finds, e.g. "
        "RAY_ADDRESS or `ray start` on this machine, else a new local one)",
    )  # fmt: skip


UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _add_server_args(group: Any) -> None:
    group.add_argument("--host", default=SERVER_DEFAULTS["host"], help="address to listen on")
    group.add_argument("--port", type=int, default=SERVER_DEFAULTS["port"], help="port to listen on")
    group.add_argument("--api-key", help="requests must send 'Authorization: Bearer KEY' (not /health)")
    group.add_argument(
        "--max-queued-requests", type=_positive_int, default=256, metavar="N",
        help="requests the server holds at once (running or queued); more get 429 with Retry-After",
    )  # fmt: skip
    group.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=UVICORN_LOG_LEVELS,
        help="uvicorn's log level (as vllm serve)",
    )
    group.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="no log line per request (as vllm serve)"
    )


def stages_from_args(args: argparse.Namespace) -> list[OmniStageConfig]:
    """The pipeline the command line describes (ValueError naming the flag when it describes none)."""
    if args.stage_config and args.model_tag:
        raise ValueError("give MODEL or --stage-config, not both")
    if bool(args.ar_stage) != bool(args.dit_stage):
        raise ValueError("--ar-stage and --dit-stage go together (an AR -> DiT pipeline)")
    if args.ar_stage:
        if args.stage_config or args.model_tag:
            raise ValueError(
                "--ar-stage/--dit-stage describe the whole pipeline: leave out MODEL and --stage-config"
            )
        stages = [
            create_ar_stage_config(0, args.ar_stage, stage_input=_rewrite_input(args.ar_system_prompt)),
            create_dit_stage_config(1, args.dit_stage),
        ]
    elif args.stage_config or is_pipeline_file(args.model_tag):
        stages = pipeline_of(args.stage_config or args.model_tag)[0]
    elif args.model_tag:  # the model's pipeline decides which of its engines the flags are for
        flags = _engine_flags(args)
        stages = stages_for_model(args.model_tag, flags.pop("revision", None), **flags)
        return [_with_flags(stage, args, {}) for stage in stages]
    else:
        raise ValueError("no pipeline: give MODEL, --stage-config FILE, or --ar-stage and --dit-stage")
    return [_with_flags(stage, args, _engine_flags(args)) for stage in stages]


def launcher_from_args(args: argparse.Namespace) -> Any:
    """The stages' launcher: ``--stage-launcher``, else the stage YAML's ``launcher``, else local (a
    ``RayLauncher`` for ``--ray-address``)."""
    path = args.stage_config or args.model_tag
    from_file = load_pipeline_file(path)[1] if is_pipeline_file(path) else None
    name = args.stage_launcher or from_file or "local"
    if args.ray_address is None:
        return name
    if name != "ray":
        raise ValueError("--ray-address goes with --stage-launcher ray (or a stage YAML with launcher: ray)")
    from vllm_omni.pipeline.ray_launcher import RayLauncher

    return RayLauncher(address=args.ray_address)


def _with_flags(
    stage: OmniStageConfig, args: argparse.Namespace, engine_flags: dict[str, Any]
) -> OmniStageConfig:
    """The stage with ``engine_flags`` (ar) or the --dit-* flags (dit) applied. An ar stage logs stats
    (vLLM's metrics in /metrics) as ``vllm serve`` does, unless --disable-log-stats or its config say
    otherwise (``vllm.LLM`` alone does not)."""
    if stage.engine_type == "ar":
        engine_args = {"disable_log_stats": args.disable_log_stats, **stage.engine_args}
        return dataclasses.replace(stage, engine_args={**engine_args, **engine_flags})
    if stage.engine_type == "dit":
        size = args.dit_size or (None, None)
        flags = {"num_inference_steps": args.dit_steps, "guidance_scale": args.dit_guidance_scale,
                 "width": size[0], "height": size[1], "compile": args.dit_compile}  # fmt: skip
        set_flags = {key: value for key, value in flags.items() if value is not None}
        return dataclasses.replace(
            stage, dit_config=dataclasses.replace(stage.dit_config or DiTConfig(), **set_flags)
        )
    return stage


def _engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine arguments given on the command line (those that differ from their defaults)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    flags = {}
    for field in dataclasses.fields(AsyncEngineArgs):
        if field.name == "model" or not hasattr(args, field.name):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if getattr(args, field.name) != default:
            flags[field.name] = getattr(args, field.name)
    return flags


def _rewrite_input(system_prompt: str | None) -> str | None:
    """The AR stage's input for ``--ar-system-prompt``: the LLM's chat template, that system turn, the
    request's text as the user turn."""
    if system_prompt is None:
        return None
    from vllm_omni.pipeline.stage_input import StageInput, chat_prompt, register_stage_input, tokenizer_source

    @register_stage_input(SYSTEM_PROMPT_INPUT)
    def with_system_prompt(data: StageInput) -> dict[str, str]:
        turns = [{"role": "system", "content": system_prompt}, {"role": "user", "content": data.text or ""}]
        return {"prompt": chat_prompt(*tokenizer_source(data.stage), turns)}

    return SYSTEM_PROMPT_INPUT


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 1024x768 (WIDTHxHEIGHT), got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return size
