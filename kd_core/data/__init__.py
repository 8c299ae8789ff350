"""Datasets: built-in, or uploaded NPZ/CSV/ZIP files, checked, split, summarised and fingerprinted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_core.data.builtin import BUILTIN_DATASETS, load_builtin
from kd_core.data.dataset import Dataset, RawData, build_dataset
from kd_core.data.images import load_zip
from kd_core.data.inspect import describe_dataset, inspect_dataset
from kd_core.data.options import KNOWN_OPTIONS, check_options
from kd_core.data.tables import load_csv, load_npz
from kd_core.errors import DatasetError

__all__ = [
    "BUILTIN_DATASETS",
    "FILE_FORMATS",
    "KNOWN_OPTIONS",
    "Dataset",
    "describe_dataset",
    "inspect_dataset",
    "load_dataset",
]

_LOADERS = {"npz": load_npz, "csv": load_csv, "zip": load_zip}
FILE_FORMATS = tuple(_LOADERS)


def load_dataset(
    source: str | Path,
    *,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """A built-in name or a .npz/.csv/.zip path, split with `seed` where the file gives no splits."""
    opts = check_options(options)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"the split seed must be a non-negative integer, got {seed!r}")
    try:
        raw = _read(source, opts)
        return build_dataset(raw, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    except MemoryError as exc:
        raise DatasetError("the dataset does not fit in memory") from exc


def source_format(source: Any, opts: dict[str, Any]) -> str | None:
    """'npz', 'csv' or 'zip' for an existing file _read would load with that reader; else None."""
    if not isinstance(source, str | Path) or (isinstance(source, str) and source in BUILTIN_DATASETS):
        return None
    path = Path(source)
    fmt = opts.get("format") or path.suffix.lower().lstrip(".")
    return fmt if fmt in _LOADERS and path.is_file() else None


def _read(source: str | Path, opts: dict[str, Any]) -> RawData:
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return load_builtin(source, opts)
    if not isinstance(source, str | Path):
        raise DatasetError(f"a dataset is a built-in name or a file path, got {type(source).__name__}")
    path = Path(source)
    fmt = opts.get("format") or path.suffix.lower().lstrip(".")
    if fmt not in _LOADERS:
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
    return _LOADERS[fmt](path, opts)
