"""Canary: the signature of every vLLM callable the patch layer wraps, pinned for vLLM 0.32.0.

A vLLM upgrade that changes one of them fails here, in CI, instead of silently in production.
"""

import importlib
import inspect

import pytest

from vllm_omni.patch.patches import PATCHES

PINNED = {
    "importlib.metadata:version": "(distribution_name)",
}


def resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_wrapped_callable_is_pinned():
    wrapped = {target for patch in PATCHES for target in patch.wraps}
    assert wrapped == set(PINNED)


@pytest.mark.parametrize("target", sorted(PINNED))
def test_signature_is_unchanged(target):
    assert str(inspect.signature(inspect.unwrap(resolve(target)))) == PINNED[target]


def test_patch_names_are_unique():
    names = [patch.name for patch in PATCHES]
    assert len(names) == len(set(names))
