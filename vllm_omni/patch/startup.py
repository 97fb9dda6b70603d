"""Start-up hook, imported by ``vllm_omni_startup.pth`` in every Python process of the environment.

It must stay nearly free (it runs even for ``python -c pass``): it only registers an import hook.
The patch list is loaded the moment something imports ``vllm``, before vLLM's own package body runs,
so ``from vllm import LLM`` already sees the patched classes and arguments.
"""

from vllm_omni.patch import patches_disabled

if not patches_disabled():
    from vllm_omni.patch import hook

    def _arm() -> None:
        from vllm_omni.patch.registry import arm

        arm("startup")

    hook.before_import("vllm", _arm)
