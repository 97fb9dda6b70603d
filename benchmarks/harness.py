"""What every benchmark script shares: the ``--quick`` flag and the result lines benchmarks/report.py reads.

A benchmark prints its rows for people, then one ``bench-result {json}`` line per headline number (and one
for its configuration), which the report collects into docs/benchmarks.md. Scripts run as
``python benchmarks/NAME.py``, so this module is imported as ``harness`` (benchmarks/ is on sys.path).
"""

from __future__ import annotations

import argparse
import json

PREFIX = "bench-result "
"""Start of a machine-readable line; the rest is one JSON object."""


def parse_args(parser: argparse.ArgumentParser, **quick) -> argparse.Namespace:
    """``parser``'s arguments plus ``--quick``: the smallest run that still takes every code path and prints
    every row (seconds, not a measurement). ``quick``: the settings it overrides (argument dest -> value)."""
    settings = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    help = f"smoke run ({settings}): its numbers mean nothing"
    parser.add_argument("--quick", action="store_true", help=help)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args


def config(text: str) -> None:
    """Print the run's configuration for the report (one line, what a reader needs to repeat it)."""
    print(PREFIX + json.dumps({"config": text}), flush=True)


def headline(measure: str, value: float, goal: str = "") -> None:
    """Print one headline number for the report: ``measure`` names it (with its unit or ratio), ``goal`` is
    what it should be (e.g. ">= 0.9x"; empty: none set)."""
    print(PREFIX + json.dumps({"measure": measure, "value": round(value, 4), "goal": goal}), flush=True)


def read_results(output: str) -> tuple[str, list[dict]]:
    """The configuration and headlines a benchmark printed in ``output`` (its stdout)."""
    lines = [json.loads(line[len(PREFIX) :]) for line in output.splitlines() if line.startswith(PREFIX)]
    configs = [line["config"] for line in lines if "config" in line]
    return "; ".join(configs), [line for line in lines if "measure" in line]
