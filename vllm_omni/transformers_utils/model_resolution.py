"""Where a stage's model is: a local folder, or a Hugging Face hub repo id at a revision.

Hub ids resolve through ``huggingface_hub``'s cache, as vLLM and diffusers resolve them: the cache is
``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``), ``HF_HUB_OFFLINE=1`` reads the cache only, and the token is
``$HF_TOKEN`` or the one ``hf auth login`` saved. Every error names the id, the revision and what is
missing. ``ar`` stages hand the id and ``revision`` to vLLM, which loads it the same way; ``dit`` stages load
the folder :func:`diffusers_folder` returns.

No torch, diffusers or vLLM at import: the CLI and the stage-config checks import this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

DIFFUSERS_INDEX = "model_index.json"


class ModelNotFoundError(ValueError):
    """A model or revision that cannot be had: not on the hub, or not in the cache while offline."""


def describe(model: str, revision: str | None = None) -> str:
    """How errors name a model: ``'org/name' (revision 'main')``; a local folder without a revision."""
    if is_local(model):
        return repr(str(model))
    return f"{str(model)!r} (revision {revision or constants.DEFAULT_REVISION!r})"


def is_local(model: str | Path) -> bool:
    """Whether ``model`` is a local path (anything else is taken as a hub repo id, as vLLM does)."""
    return Path(model).exists()


def model_file(model: str, filename: str, revision: str | None = None) -> Path | None:
    """The local path of ``filename`` in ``model``: fetched into the cache when online, from the cache when
    offline. None when the model exists but has no such file (offline: its cached snapshot has none).

    Raises :class:`ModelNotFoundError` when the model or its revision cannot be had.
    """
    if is_local(model):
        path = Path(model) / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(model, filename, revision=revision, local_files_only=_offline()))
    except LocalEntryNotFoundError as error:  # not cached, and the hub is off or unreachable
        cached_snapshot(model, revision, cause=error)  # raises when the revision itself is not cached
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as error:
        raise ModelNotFoundError(_not_found(model, revision, error)) from None
    except EntryNotFoundError:  # on the hub, without that file
        return None


def cached_snapshot(model: str, revision: str | None = None, cause: Exception | None = None) -> Path:
    """The cached snapshot folder of hub id ``model`` at ``revision``, without the network.

    Raises :class:`ModelNotFoundError` naming the cache, the revisions it holds, and why it could not
    download (offline, or ``cause``).
    """
    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True, ignore_patterns="*"))
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as error:
        raise ModelNotFoundError(_not_found(model, revision, error)) from None
    cached = _cached_revisions(model)
    held = f"it holds revision(s) {cached} of it" if cached else "it holds no revision of it"
    why = "HF_HUB_OFFLINE=1 forbids downloading" if _offline() else f"the hub could not be reached ({cause})"
    raise ModelNotFoundError(
        f"{describe(model, revision)} is not in the Hugging Face cache {constants.HF_HUB_CACHE} ({held}) "
        f"and {why}"
    )


def ensure_available(model: str, revision: str | None = None) -> None:
    """Refuse, naming id and revision, a hub id that cannot load here: offline and not in the cache. (Online
    the loader downloads it, and the hub's own errors name the id.)"""
    if not is_local(model) and _offline():
        cached_snapshot(model, revision)


def model_folder(model: str, revision: str | None = None) -> Path:
    """The local folder of ``model``: itself, or a hub id's snapshot (fetched whole into the cache when
    online; the cached one when offline). Raises :class:`ModelNotFoundError` naming id and revision."""
    if is_local(model):
        return Path(model)
    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=_offline()))
    except LocalEntryNotFoundError as error:
        return cached_snapshot(model, revision, cause=error)  # raises naming what the cache holds
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as error:
        raise ModelNotFoundError(_not_found(model, revision, error)) from None


def diffusers_folder(model: str, revision: str | None = None) -> Path:
    """The local diffusers folder (``model_index.json`` and one subfolder per component) of ``model``.

    A hub id is fetched with diffusers' own file selection (``DiffusionPipeline.download``: the components
    ``model_index.json`` lists, safetensors preferred), or taken from the cache when offline. Raises
    ``ValueError`` naming id and revision when there is no ``model_index.json`` or a listed component is
    missing, :class:`ModelNotFoundError` when the model cannot be had.
    """
    if model_file(model, DIFFUSERS_INDEX, revision) is None:
        where = " in its cached snapshot (HF_HUB_OFFLINE=1)" if _offline() and not is_local(model) else ""
        raise ValueError(
            f"{describe(model, revision)} is not a diffusers pipeline: it has no {DIFFUSERS_INDEX}{where} (a "
            "vLLM model has config.json and runs in an 'ar' stage)"
        )
    folder = Path(model) if is_local(model) else _download_pipeline(model, revision)
    missing = [name for name in pipeline_components(folder) if not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"{describe(model, revision)}: {DIFFUSERS_INDEX} lists component(s) {missing} that the pipeline "
            f"needs and {folder} lacks"
        )
    return folder


def pipeline_class_name(folder: str | Path) -> str:
    """The diffusers pipeline class a diffusers folder's ``model_index.json`` declares."""
    return _index(folder)["_class_name"]


def pipeline_components(folder: str | Path) -> list[str]:
    """The components a diffusers folder's ``model_index.json`` lists (``[library, class]`` entries; the
    ones set to ``[null, null]`` are absent on purpose)."""
    entries = _index(folder).items()
    return [name for name, value in entries if isinstance(value, list) and value[0] is not None]


def _index(folder: str | Path) -> dict:
    return json.loads((Path(folder) / DIFFUSERS_INDEX).read_text())


def _download_pipeline(model: str, revision: str | None) -> Path:
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(model, revision=revision, local_files_only=_offline()))
    except LocalEntryNotFoundError as error:
        raise ModelNotFoundError(f"{describe(model, revision)}: {error}") from None


def _offline() -> bool:
    return constants.HF_HUB_OFFLINE


def _cached_revisions(model: str) -> list[str]:
    """Branch/tag names and commits of ``model`` in the cache."""
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model, repo_type="model")
    folders = [storage / "refs", storage / "snapshots"]
    return sorted(path.name for folder in folders if folder.is_dir() for path in folder.iterdir())


def _not_found(model: str, revision: str | None, error: Exception) -> str:
    if isinstance(error, HFValidationError):
        return f"{str(model)!r} is neither a local folder nor a Hugging Face repo id ({error})"
    if isinstance(error, RevisionNotFoundError):
        return f"{describe(model, revision)}: the hub has no such revision of {model!r}"
    if isinstance(error, GatedRepoError):
        return f"{describe(model, revision)} is gated: accept its terms on the hub and set HF_TOKEN"
    return f"{describe(model, revision)} is not on the hub (if it is private, set HF_TOKEN)"
