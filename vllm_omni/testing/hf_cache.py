"""Put a local model folder into a Hugging Face cache the way ``huggingface_hub`` lays out a download, so
tests load it by hub repo id offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` or ``HF_HOME`` pointing there).

``<cache>/models--<org>--<name>/``: ``blobs/<sha256>`` (the file contents), ``snapshots/<commit>/<path>``
(relative symlinks to the blobs), ``refs/<revision>`` (the commit). ``use_offline_hf_home`` points a test
process and the processes it starts at such a cache, offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name


def add_to_hf_cache(cache: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> str:
    """Cache ``folder``'s files as ``repo_id`` at branch/tag ``revision``; returns the commit (a hash of the
    repo id and the contents, so equal folders get equal commits)."""
    storage = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    commit = hashlib.sha1(repr((repo_id, sorted(digests.values()))).encode()).hexdigest()
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for path, digest in digests.items():
        blob = storage / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return commit


def use_offline_hf_home(monkeypatch, home: str | Path) -> Path:
    """Make ``home`` the Hugging Face home, offline, for this process (``huggingface_hub``'s settings, read at
    its import) and the processes it starts (the environment); returns its hub cache, ``home/hub``."""
    from huggingface_hub import constants

    cache = Path(home) / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
