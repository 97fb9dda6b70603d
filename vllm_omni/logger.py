"""vllm_omni's logging, set up as vLLM sets up its own (``vllm/logger.py``): one handler on the package
logger, vLLM's line format, level ``VLLM_LOGGING_LEVEL`` (default INFO), off with
``VLLM_CONFIGURE_LOGGING=0``. Stage processes that never import vLLM log the same way."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"


def init_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a ``vllm_omni`` module); configures the package logger on first use."""
    package = logging.getLogger("vllm_omni")
    if not package.handlers and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        package.addHandler(handler)
        package.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        package.propagate = False
    return logging.getLogger(name)
