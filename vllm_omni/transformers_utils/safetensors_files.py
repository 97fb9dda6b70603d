"""Which safetensors files of a checkpoint folder hold a model part's tensors."""

from __future__ import annotations

import json
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"


def files_holding(folder: Path, prefix: str) -> list[Path]:
    """The files that may hold tensors named ``prefix...``: those the index of a sharded checkpoint maps
    such names to, or every ``*.safetensors`` file of an unsharded one."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [
            folder / name for name in sorted({f for key, f in weight_map.items() if key.startswith(prefix)})
        ]
    return sorted(folder.glob("*.safetensors"))
