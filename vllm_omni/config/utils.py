"""Helpers shared by the config dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_known_keys(cls: type[T], values: dict[str, Any], what: str) -> T:
    """``cls(**values)``, refusing keys that are not fields of ``cls``: "<what> [keys]; allowed: [...]"."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what} {unknown}; allowed: {sorted(known)}")
    return cls(**values)
