"""``vllm ... --omni``: vLLM 0.32's CLI hands every command line with ``--omni`` to ``main`` here
(``maybe_run_omni`` in ``vllm/entrypoints/cli/main.py``); the ``vllm`` console script stays vLLM's."""

from __future__ import annotations

import sys

from vllm_omni.entrypoints.cli.serve import OmniServeCommand

COMMANDS = (OmniServeCommand,)


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the process's arguments after the program name) and run the subcommand;
    a bad flag or value is an argparse error naming it (exit code 2)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", description="vLLM with omni pipelines (--omni)")
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="{serve}")
    for command in COMMANDS:
        command.subparser_init(subparsers)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.dispatch_function(args)
    except ValueError as error:  # a command line that describes no pipeline, or a bad stage config
        parser.exit(2, f"vllm {args.subcommand} --omni: error: {error}\n")
