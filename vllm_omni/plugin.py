"""``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts.

The start-up hook normally armed the patch layer already in those processes; ``register()`` makes sure
of it where the hook did not run (e.g. an interpreter started with ``-S``). It is re-entrant.
"""

from vllm_omni.patch import registry


def register() -> None:
    """Arm the patch layer in this process (idempotent)."""
    registry.arm("plugin")
