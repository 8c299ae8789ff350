"""Loader options (a config's `data_options`): the known keys and their checked values."""

from __future__ import annotations

from typing import Any

from kd_core.errors import DatasetError

# Every key any loader understands. A loader ignores the keys of other formats, so one options
# dict can travel with a config whatever the dataset, but a misspelt key is an error.
KNOWN_OPTIONS = {
    "label_column": "CSV: the column that holds the labels (default 'label')",
    "image_size": "ZIP: side of the resized images, an integer or [height, width] (default 32)",
    "format": "file type when the file name has no telling extension: npz, csv or zip",
    "n_samples": "synthetic: number of samples (default 2000)",
    "n_features": "synthetic: number of features (default 20)",
    "n_classes": "synthetic: number of classes (default 4)",
    "label_noise": "synthetic: fraction of training labels flipped to another class (default 0)",
    "seed": "synthetic: seed of the generated data (default 0)",
}


def check_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise DatasetError('dataset options must be an object such as {"label_column": "label"}')
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise DatasetError(
            f"unknown dataset option(s): {', '.join(map(str, unknown))}; known: {', '.join(KNOWN_OPTIONS)}"
        )
    return dict(options)


def int_option(options: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DatasetError(f"dataset option '{key}' must be an integer from {lo} to {hi}, got {value!r}")
    return value


def float_option(options: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise DatasetError(f"dataset option '{key}' must be a number from {lo} to {hi}, got {value!r}")
    return float(value)


def image_size_option(options: dict[str, Any], default: int = 32) -> tuple[int, int]:
    """(height, width) from an int or a [height, width] pair."""
    value = options.get("image_size", default)
    if isinstance(value, list | tuple) and len(value) == 2:
        pair = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        pair = [value, value]
    else:
        raise DatasetError(
            f"dataset option 'image_size' must be an integer or [height, width], got {value!r}"
        )
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
            raise DatasetError(
                f"dataset option 'image_size' sides must be integers from 1 to 1024, got {value!r}"
            )
    return pair[0], pair[1]
