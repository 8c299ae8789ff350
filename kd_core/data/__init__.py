"""Datasets: built-in (in memory), or a store ingested from an NPZ/CSV/ZIP file or a folder; split and summarised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_core.data.builtin import BUILTIN_DATASETS, load_builtin
from kd_core.data.dataset import Dataset, build_dataset
from kd_core.data.inspect import describe_dataset, inspect_dataset
from kd_core.data.options import KNOWN_OPTIONS, check_options
from kd_core.data.store import FILE_FORMATS, cached_store, ingest, is_store, open_store, store_dataset
from kd_core.errors import DatasetError

__all__ = [
    "BUILTIN_DATASETS",
    "FILE_FORMATS",
    "KNOWN_OPTIONS",
    "Dataset",
    "describe_dataset",
    "ingest",
    "inspect_dataset",
    "is_store",
    "load_dataset",
    "open_store",
]


def load_dataset(
    source: str | Path,
    *,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """A built-in name, a store directory, or a .npz/.csv/.zip path, split with `seed` where no splits are given.

    A file is ingested into a store once (kd_core/data/store.py, cached by content) and read
    memory-mapped, so files and uploads pass the same checks.
    """
    opts = check_options(options)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"the split seed must be a non-negative integer, got {seed!r}")
    try:
        if isinstance(source, str) and source in BUILTIN_DATASETS:
            raw = load_builtin(source, opts)
            return build_dataset(raw, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
        store = open_store(store_path(source, opts))
        return store_dataset(store, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    except MemoryError as exc:
        raise DatasetError("the dataset does not fit in memory") from exc


def store_path(source: Any, opts: dict[str, Any]) -> Path:
    """The store directory for `source`: itself when it is one, else the cached store of a data file."""
    if not isinstance(source, str | Path):
        raise DatasetError(
            f"a dataset is a built-in name, a store or a file path, got {type(source).__name__}"
        )
    path = Path(source)
    if is_store(path):
        return path
    if path.is_dir():
        raise DatasetError(
            f"{path.name!r} is a folder, not a dataset store: ingest it first (kd_core.data.store.ingest)"
        )
    fmt = opts.get("format") or path.suffix.lower().lstrip(".")
    if fmt not in FILE_FORMATS:
        if not path.suffix and not path.exists():
            raise DatasetError(
                f"unknown dataset {str(source)!r}: use a built-in one ({', '.join(BUILTIN_DATASETS)}) "
                "or a .npz, .csv or .zip file"
            )
        raise DatasetError(
            f"unsupported dataset file type {path.suffix or fmt!r}: upload a .npz, .csv or .zip file"
        )
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path.name}")
    return cached_store(path, fmt, opts)
