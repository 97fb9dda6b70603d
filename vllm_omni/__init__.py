"""vLLM-Omni: vLLM 0.32 with omni patches.

This module stays light on purpose: the start-up hook imports ``vllm_omni.patch.startup`` in every
Python process of the environment, which imports this package first.
"""

from vllm_omni.version import __version__

__all__ = ["__version__"]
