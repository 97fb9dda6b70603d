"""Post-import hooks: run a callback right after a named module finishes executing.

This is how the patch layer changes vLLM "before first use" without importing vLLM itself: a
``sys.meta_path`` finder watches for the modules that patches target, lets the normal finder load them,
and calls the registered callbacks the moment their body has run, before any other module can do
``from <module> import <name>``.

It runs at interpreter start-up, so it imports only modules Python has already loaded by then
(``importlib.abc`` alone would cost ~17 ms: it pulls in ``importlib.resources``); the finder and loader
follow the import protocols by duck typing instead of subclassing the ABCs.
"""

from __future__ import annotations

import sys
from _thread import RLock
from types import ModuleType

_callbacks: dict[str, list] = {}  # module name -> callbacks taking the module, run after it executes
_before: dict[str, list] = {}  # module name -> callbacks without arguments, run before it is found
_lock = RLock()


class _CallbackLoader:
    """Wraps the real loader of a watched module; fires the callbacks after ``exec_module``."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Some loaders read spec.loader back; hand them the real one while the body runs.
        module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _fire(self._name, module)

    def __getattr__(self, attr: str):
        return getattr(self._loader, attr)


class _PostImportFinder:
    """Finds watched modules through the rest of ``sys.meta_path`` and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname in _before:
            for callback in _before.pop(fullname):
                callback()
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def before_import(module_name: str, callback) -> None:
    """Call ``callback()`` once, when ``module_name`` is about to be imported (at once if it already is)."""
    with _lock:
        _install()
        if module_name not in sys.modules:
            _before.setdefault(module_name, []).append(callback)
            return
    callback()


def when_imported(module_name: str, callback) -> None:
    """Call ``callback(module)`` right after ``module_name`` is imported (at once if it already is)."""
    with _lock:
        _install()
        module = sys.modules.get(module_name)
        if module is None:
            _callbacks.setdefault(module_name, []).append(callback)
            return
    callback(module)


def _install() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _fire(name: str, module: ModuleType) -> None:
    with _lock:
        callbacks = _callbacks.pop(name, [])
    for callback in callbacks:
        callback(module)
