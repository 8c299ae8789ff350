"""Dataset stores in storage: written by ingestion, read by jobs and the index, removed with their dataset.

A store is a directory (kd_core.data.store). On local storage it is written in place under MEDIA_ROOT
(kd_core writes it atomically: a temp sibling renamed at the end); on remote storage (S3 and friends) it is
written to a local temporary folder and its files copied up, and readers get a cached local copy.
Each dataset's stores live under one folder, `Dataset.store_folder`, removed whole with the dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, default_storage


def _local(name: str, storage: Storage) -> Path | None:
    """The filesystem path of `name` on local storage, else None."""
    try:
        return Path(storage.path(name))
    except NotImplementedError:
        return None


def tree_size(path: Path) -> int:
    """Bytes of the regular files under `path` (what the store takes on disk, for the quota)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def ingest_to_storage(
    source: str | os.PathLike,
    name: str,
    *,
    options: dict[str, Any] | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    storage: Storage | None = None,
) -> tuple[dict[str, Any], int]:
    """Ingest `source` into the store `name` in storage; returns (kd_core's summary, bytes stored).

    On any failure nothing of `name` remains (kd_core leaves no partial store; copies made here are removed).
    """
    from kd_core.data.store import ingest

    storage = storage or default_storage
    dest = _local(name, storage)
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            summary = ingest(source, dest, options=options, progress=progress, should_stop=should_stop)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # renamed just before an error: not ours to keep
            raise
        return summary, tree_size(dest)
    with tempfile.TemporaryDirectory(dir=os.environ.get("KD_TMP_DIR")) as tmp:
        local = Path(tmp) / "store"
        summary = ingest(source, local, options=options, progress=progress, should_stop=should_stop)
        size = 0
        try:
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                rel = path.relative_to(local).as_posix()
                with open(path, "rb") as fh:
                    storage.save(f"{name}/{rel}", File(fh, name=path.name))
                size += path.stat().st_size
        except BaseException:
            delete_tree(name, storage)
            raise
    return summary, size


def store_exists(name: str, storage: Storage | None = None) -> bool:
    """Whether the store `name` is in storage (kd_core renames a store into place only once complete)."""
    storage = storage or default_storage
    return bool(name) and storage.exists(f"{name}/meta.json")


def delete_tree(name: str, storage: Storage | None = None) -> None:
    """Remove a folder of storage and everything under it; a missing folder is not an error."""
    if not name or PurePosixPath(name).parts[:1] != ("stores",):
        return  # only ever stores: a bug elsewhere must not turn this into rm -rf of storage
    storage = storage or default_storage
    path = _local(name, storage)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        _prune_empty_parents(path.parent, Path(settings.MEDIA_ROOT) / "stores")
        return
    try:
        dirs, files = storage.listdir(name)
    except (FileNotFoundError, OSError):
        return
    for f in files:
        try:
            storage.delete(f"{name}/{f}")
        except FileNotFoundError:
            pass
    for d in dirs:
        delete_tree(f"{name}/{d}", storage)


def _prune_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        folder = folder.parent


def local_store(name: str, cache_root: Path, storage: Storage | None = None) -> Path:
    """A local directory holding the store `name`: itself on local storage, else a cached copy.

    The copy is made once per store name (a finished store never changes), into a temp sibling renamed
    into place, so concurrent readers never see half a copy.
    """
    storage = storage or default_storage
    path = _local(name, storage)
    if path is not None:
        return path
    dest = cache_root / hashlib.sha256(name.encode()).hexdigest()[:24]
    if dest.is_dir():
        return dest
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{dest.name}.{uuid.uuid4().hex}.part"
    try:
        _download(name, tmp, storage)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(name: str, dest: Path, storage: Storage) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    dirs, files = storage.listdir(name)
    for f in files:
        with storage.open(f"{name}/{f}", "rb") as src, open(dest / f, "wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)
    for d in dirs:
        _download(f"{name}/{d}", dest / d, storage)
