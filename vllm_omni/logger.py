"""vllm_omni's logging, set up as vLLM sets up its own (``vllm/logger.py``): vLLM's line format, level
``VLLM_LOGGING_LEVEL`` (default INFO) on the package logger, off with ``VLLM_CONFIGURE_LOGGING=0``. Stage
processes that never import vLLM log the same way. Records still propagate: an application (or pytest)
that configured the root logger gets them there instead, and no handler is added."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"
_PACKAGE = "vllm_omni"


def init_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a ``vllm_omni`` module); sets up the package logger on first use."""
    package = logging.getLogger(_PACKAGE)
    if package.level == logging.NOTSET and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
        package.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        if not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
            package.addHandler(handler)
    return logging.getLogger(name)
