"""A JSON summary of a dataset with a small preview: what the web app shows once a dataset is ingested."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from kd_core.data.dataset import Dataset
from kd_core.errors import DatasetError

MAX_PREVIEW_IMAGES = 16
MAX_PREVIEW_ROWS = 10
MAX_PREVIEW_COLUMNS = 50
PREVIEW_SIDE = 96


def inspect_dataset(path_or_name: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise a built-in dataset, a store, or a data file (ingested into its cached store first).

    A store is never loaded whole: labels and split codes are read, x stays memory-mapped and only the
    preview rows are touched. Raises DatasetError with a user-facing reason.
    """
    from kd_core.data import BUILTIN_DATASETS, load_dataset, store_path
    from kd_core.data.options import check_options
    from kd_core.data.store import open_store, store_dataset

    opts = check_options(options)
    if isinstance(path_or_name, str) and path_or_name in BUILTIN_DATASETS:
        return describe_dataset(load_dataset(path_or_name, options=opts))
    try:
        store = open_store(store_path(path_or_name, opts))
        return describe_dataset(store_dataset(store, stats=False))
    except MemoryError as exc:
        raise DatasetError("the dataset does not fit in memory") from exc


def describe_dataset(ds: Dataset) -> dict[str, Any]:
    """Plain JSON types only: the web app stores this and sends it to the browser."""
    warnings = list(ds.info.get("warnings", []))
    empty = ds.empty_classes()
    if empty:
        warnings.append(f"{len(empty)} class(es) have no training example: {', '.join(empty[:10])}")
    if ds.info.get("skipped_count"):
        warnings.append(f"{ds.info['skipped_count']} file(s) in the archive were skipped")
    if not ds.labeled:
        warnings.append("no labels: usable as a transfer set for distillation, with the teacher's classes")
    summary: dict[str, Any] = {
        "name": ds.name,
        "format": ds.format,
        "num_samples": ds.num_samples,
        "num_classes": ds.num_classes,
        "class_names": list(ds.class_names),
        "input_shape": list(ds.input_shape),
        "class_counts": ds.class_counts(),
        "empty_classes": empty,
        "splits": {"train": len(ds.x_train), "val": len(ds.x_val), "test": len(ds.x_test)},
        "labeled": ds.labeled,
        "is_image": ds.is_image,
        "fingerprint": ds.fingerprint,
        "warnings": warnings,
        "preview": _image_preview(ds) if ds.is_image else _table_preview(ds),
    }
    for key in ("skipped", "skipped_count", "ignored_arrays", "label_column", "color", "image_size"):
        if key in ds.info:
            summary[key] = ds.info[key]
    return summary


def _preview_indices(ds: Dataset, limit: int) -> list[int]:
    """Round-robin over classes so every class shows up in the preview."""
    if ds.y_train is None:
        return list(range(min(limit, len(ds.x_train))))
    per_class = [list(np.flatnonzero(ds.y_train == c)) for c in np.unique(ds.y_train)]
    picked: list[int] = []
    for rank in range(limit):
        for idx in per_class:
            if rank < len(idx) and len(picked) < limit:
                picked.append(int(idx[rank]))
        if len(picked) >= limit:
            break
    return picked


def _label(ds: Dataset, i: int) -> str | None:
    if ds.y_train is None:
        return None
    label = int(ds.y_train[i])
    return ds.class_names[label] if label < len(ds.class_names) else str(label)


def _image_preview(ds: Dataset) -> dict[str, Any]:
    from PIL import Image

    idx = _preview_indices(ds, MAX_PREVIEW_IMAGES)
    batch = ds.x_train[idx]
    lo, hi = float(batch.min()), float(batch.max())
    samples = []
    for i, x in zip(idx, batch):
        # Raw values may be [0, 1], [0, 255] or standardised; show each plausibly.
        if lo >= 0 and hi <= 1:
            img = x * 255
        elif lo >= 0 and hi <= 255:
            img = x
        else:
            span = float(x.max() - x.min()) or 1.0
            img = (x - x.min()) / span * 255
        img = np.clip(img, 0, 255).round().astype(np.uint8)
        c = img.shape[0]
        if c in (3, 4):
            pil = Image.fromarray(img.transpose(1, 2, 0), "RGB" if c == 3 else "RGBA")
        else:
            pil = Image.fromarray(img[0], "L")
        pil.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        samples.append({"label": _label(ds, i), "png": base64.b64encode(buf.getvalue()).decode("ascii")})
    return {"kind": "image", "samples": samples}


def _table_preview(ds: Dataset) -> dict[str, Any]:
    flat = ds.x_train[:MAX_PREVIEW_ROWS].reshape(min(MAX_PREVIEW_ROWS, len(ds.x_train)), -1)
    names = ds.info.get("feature_names") or [f"x{i}" for i in range(flat.shape[1])]
    columns = list(names[:MAX_PREVIEW_COLUMNS])
    rows: list[list[Any]] = [[float(f"{v:.6g}") for v in row[:MAX_PREVIEW_COLUMNS]] for row in flat]
    if ds.labeled:
        columns.append(ds.info.get("label_column", "label"))
        for i, row in enumerate(rows):
            row.append(_label(ds, i))
    return {
        "kind": "table",
        "columns": columns,
        "rows": rows,
        "columns_truncated": flat.shape[1] > MAX_PREVIEW_COLUMNS,
    }
