"""The patch layer: every change vllm-omni makes to vLLM, applied in every process vLLM starts.

``patches.py`` is the list (target, replacement, reason), ``registry.py`` applies it (version guard,
idempotence), ``hook.py`` runs patches right after their target module executes, ``startup.py`` arms it
from the ``.pth`` start-up hook. This package's ``__init__`` imports nothing heavy: it runs at start-up.
"""

import os

DISABLE_ENV = "VLLM_OMNI_DISABLE_PATCHES"


def patches_disabled() -> bool:
    """True when ``VLLM_OMNI_DISABLE_PATCHES`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
