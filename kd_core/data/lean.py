"""Inspecting an NPZ, CSV or ZIP upload without loading it: x arrays are read from disk in bounded chunks."""

from __future__ import annotations

import contextlib
import shutil
import struct
import tempfile
import zipfile
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kd_core.data.dataset import (
    Dataset,
    carve_splits,
    check_finite,
    check_labels,
    check_split,
    check_x_layout,
    resolve_classes,
    stream_fingerprint,
)
from kd_core.data.images import (
    MAX_REPORTED_SKIPS,
    _decode_split,
    _no_images_message,
    _plan,
)
from kd_core.data.tables import (
    NPZ_KEYS,
    check_npz_headers,
    csv_fingerprint_options,
    csv_info,
    csv_labels,
    csv_nonfinite_message,
    npz_class_names,
    npz_info,
    open_csv,
    read_npy_header,
)
from kd_core.errors import DatasetError

# At most this much of an x array is in memory at once (as float32) while checking and hashing it.
CHUNK_BYTES = 8 * 1024**2
X_KEYS = ("x", "x_val", "x_test")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


class LazyRows:
    """Rows `index` (all when None) of an on-disk array, read as float32 only when indexed."""

    def __init__(self, array: np.ndarray, index: np.ndarray | None = None) -> None:
        self.array = array
        self.index = index
        self.shape = (len(self), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.array) if self.index is None else len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(len(self))[key]
        if self.index is not None:
            rows = self.index[rows]
        return np.asarray(self.array[rows], dtype=np.float32)

    def chunks(self) -> Iterator[memoryview]:
        """The rows as C-order float32 bytes, in order, CHUNK_BYTES at a time."""
        step = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(self.array.shape[1:]))))
        for start in range(0, len(self), step):
            yield np.ascontiguousarray(self[start : start + step]).data


@contextlib.contextmanager
def open_npz_dataset(path: Path, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2):
    """load_npz + build_dataset with the same checks and errors, but x splits are LazyRows on disk.

    Stored (uncompressed) members are memory-mapped in place; compressed ones are unpacked to a
    temporary file first, removed on exit. Only labels and class names are loaded whole.
    """
    check_npz_headers(path)
    with contextlib.ExitStack() as stack:
        arrays: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(path) as zf, np.load(path, allow_pickle=False) as npz:
                ignored = sorted(k for k in npz.files if k not in NPZ_KEYS)
                for key in NPZ_KEYS:
                    if key not in npz.files:
                        continue
                    if key in X_KEYS:
                        arrays[key] = _map_member(path, zf, zf.getinfo(f"{key}.npy"), stack)
                    else:
                        arrays[key] = npz[key]
        except DatasetError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(f"cannot read the NPZ file: {exc}") from exc
        info = npz_info(arrays, ignored)
        class_names = npz_class_names(arrays)
        yield _build(path.stem, arrays, class_names, info, seed, val_fraction, test_fraction)


@contextlib.contextmanager
def open_csv_dataset(
    path: Path,
    options: dict[str, Any],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
):
    """load_csv + build_dataset with the same checks and errors; rows go to a temporary float32 file.

    Only the labels (as strings) and their line numbers stay in memory, as load_csv's error
    messages need them.
    """
    with tempfile.TemporaryDirectory(prefix="kd-csv-") as tmp, open_csv(path, options) as opened:
        header, label_idx, feat_idx, rows = opened
        width = len(feat_idx)
        labels: list[str] = []
        lines = array("q")
        batch = array("d")
        first_bad: tuple[int, int, float, int] | None = None
        n = 0
        target = Path(tmp) / "x.f32"
        with open(target, "wb") as out:

            def spill() -> None:
                nonlocal first_bad
                block = np.array(batch, dtype=np.float64).reshape(-1, width)  # a copy: batch is reused
                bad = ~np.isfinite(block)
                if first_bad is None and bad.any():
                    r, c = (int(v) for v in np.argwhere(bad)[0])
                    row = n - len(block) + r
                    first_bad = (row, c, float(block[r, c]), lines[row])
                with np.errstate(over="ignore"):  # beyond float32: refused as infinite by _check_x, as loaded
                    out.write(block.astype(np.float32).tobytes())
                del batch[:]

            for line, row_values, label in rows:
                batch.extend(row_values)
                if label is not None:
                    labels.append(label)
                lines.append(line)
                n += 1
                if len(batch) * 8 >= CHUNK_BYTES:
                    spill()
            if batch:
                spill()
        if not n:
            raise DatasetError("the CSV file has a header but no data rows")
        if first_bad is not None:
            row, c, value, line = first_bad
            raise DatasetError(csv_nonfinite_message(header[feat_idx[c]], value, row, line))
        y, class_names = csv_labels(labels, lines) if label_idx is not None else (None, None)
        del labels
        x = np.memmap(target, dtype=np.float32, mode="r", shape=(n, width))
        yield _build(
            path.stem,
            {"x": x, "y": y},
            class_names,
            csv_info(header, label_idx, feat_idx),
            seed,
            val_fraction,
            test_fraction,
            fmt="csv",
            fingerprint_options=csv_fingerprint_options(header, label_idx),
        )


class _Pixels:
    """Decoded uint8 (N, H, W, 3) images on disk, seen as load_zip's float32 (N, C, H, W) in [0, 1]."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray, gray: bool) -> None:
        self.raw, self.gray = raw, gray
        self.shape = (len(raw), 1 if gray else 3, int(raw.shape[1]), int(raw.shape[2]))

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, rows: Any) -> np.ndarray:
        x = np.asarray(self.raw[rows])
        x = x[..., :1] if self.gray else x
        return x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # exactly load_zip's conversion


@contextlib.contextmanager
def open_zip_dataset(
    path: Path,
    options: dict[str, Any],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
):
    """load_zip + build_dataset with the same checks and errors; images are decoded one at a time to disk."""
    size, layout, skipped, class_names = _plan(path, options)
    class_index = {name: i for i, name in enumerate(class_names)}
    with tempfile.TemporaryDirectory(prefix="kd-zip-") as tmp:
        decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        gray = True
        with zipfile.ZipFile(path) as zf:
            for split, classes in layout.items():
                target = Path(tmp) / f"{split}.u8"
                labels: list[int] = []
                with open(target, "wb") as out:
                    for hwc, is_gray, cls in _decode_split(zf, classes, size, skipped):
                        out.write(hwc.tobytes())
                        gray = gray and is_gray
                        labels.append(class_index[cls])
                shape = (len(labels), size[0], size[1], 3)
                raw = (
                    np.memmap(target, dtype=np.uint8, mode="r", shape=shape)
                    if labels
                    else np.zeros(shape, np.uint8)
                )
                decoded[split] = (raw, np.array(labels, dtype=np.int64))
        if not len(decoded["train"][1]):
            raise DatasetError(_no_images_message(skipped))
        arrays: dict[str, Any] = {}
        for split, (raw, labels_array) in decoded.items():
            key = "" if split == "train" else f"_{split}"
            arrays[f"x{key}"], arrays[f"y{key}"] = _Pixels(raw, gray), labels_array
        info: dict[str, Any] = {"color": "grayscale" if gray else "rgb", "image_size": list(size)}
        if skipped:
            info["skipped"] = skipped[:MAX_REPORTED_SKIPS]
            info["skipped_count"] = len(skipped)
        yield _build(
            path.stem,
            arrays,
            class_names,
            info,
            seed,
            val_fraction,
            test_fraction,
            fmt="zip",
            fingerprint_options={"image_size": list(size), "color": info["color"]},
        )


def _map_member(
    path: Path, zf: zipfile.ZipFile, member: zipfile.ZipInfo, stack: contextlib.ExitStack
) -> np.ndarray:
    """A read-only memory map of one .npy member (headers already checked by check_npz_headers)."""
    if member.compress_type == zipfile.ZIP_STORED and not member.flag_bits & 1:
        with open(path, "rb") as f:
            f.seek(member.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if fields[0] != b"PK\x03\x04":
                raise DatasetError(f"cannot read the NPZ file: bad local header for '{member.filename}'")
            f.seek(fields[9] + fields[10], 1)  # file name and extra field
            start = f.tell()
            shape, fortran, dtype = read_npy_header(f, member.filename.removesuffix(".npy"))
            offset = f.tell()
        if offset - start + int(np.prod(shape)) * dtype.itemsize > member.file_size:
            raise DatasetError(f"cannot read the NPZ file: array '{member.filename}' is truncated")
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(
            path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )
    # Compressed: unpack this one member to disk, streamed, and map that.
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kd-npz-"))
    target = Path(tmp) / member.filename.replace("/", "_")
    with zf.open(member) as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
    return np.load(target, mmap_mode="r", allow_pickle=False)


def _check_x(x: np.ndarray, key: str, *, allow_empty: bool = False) -> None:
    """check_x without the whole float32 copy: the finite check runs chunk by chunk."""
    check_x_layout(x.shape, x.dtype, key, allow_empty=allow_empty)
    rows = LazyRows(x)
    step = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), step):
        check_finite(rows[start : start + step], key, offset=start)


def _build(
    name: str,
    arrays: dict[str, np.ndarray],
    class_names: list[str] | None,
    info: dict[str, Any],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    *,
    fmt: str = "npz",
    fingerprint_options: dict[str, Any] | None = None,
) -> Dataset:
    """build_dataset's checks in build_dataset's order, on mapped arrays (uploads: no label noise)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 0.9):
        raise DatasetError(
            "val_fraction and test_fraction must be in [0, 1) and leave room for training data"
        )
    x, y_raw = arrays["x"], arrays.get("y")
    labeled = y_raw is not None
    _check_x(x, "x")
    y = check_labels(y_raw, "y", len(x)) if labeled else None
    given: dict[str, tuple[LazyRows, np.ndarray | None]] = {}
    for split in ("val", "test"):
        xs, ys = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if xs is None:
            if ys is not None:
                raise DatasetError(f"'y_{split}' is given without 'x_{split}'")
            continue
        _check_x(xs, f"x_{split}", allow_empty=True)
        given[split] = (LazyRows(xs), check_split(split, xs.shape, x.shape, ys, labeled))

    labels = [y] + [v[1] for v in given.values()] if y is not None else None
    names, num_classes = resolve_classes(class_names, labels)

    rng = np.random.default_rng(seed)
    missing = [s for s in ("val", "test") if s not in given]
    fractions = {"val": val_fraction, "test": test_fraction}
    parts = carve_splits(y, len(x), {s: fractions[s] for s in missing}, rng)
    splits: dict[str, tuple[LazyRows, np.ndarray | None]] = {
        s: (LazyRows(x, idx), None if y is None else y[idx]) for s, idx in parts.items()
    }
    splits.update(given)
    input_shape = tuple(int(d) for d in x.shape[1:])
    f32 = np.dtype(np.float32).str
    fingerprint = stream_fingerprint(
        fmt,
        {s: (f32, rows.shape, rows.chunks(), ys) for s, (rows, ys) in splits.items()},
        names,
        fingerprint_options or {},
    )
    return Dataset(
        name=name,
        format=fmt,
        x_train=splits["train"][0],  # type: ignore[arg-type]  # LazyRows: indexable like an array
        y_train=splits["train"][1],
        x_val=splits["val"][0],  # type: ignore[arg-type]
        y_val=splits["val"][1],
        x_test=splits["test"][0],  # type: ignore[arg-type]
        y_test=splits["test"][1],
        class_names=names,
        num_classes=num_classes,
        input_shape=input_shape,
        is_image=x.ndim == 4 and len(input_shape) == 3,
        preprocessing={},  # inspection does not show it; training computes it from loaded data
        fingerprint=fingerprint,
        info=info,
    )
