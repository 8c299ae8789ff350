"""NPZ and CSV checks shared by the store's ingest: headers, names, labels; nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import zipfile
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kd_core.data import dataset as limits
from kd_core.errors import DatasetError
from kd_core.limits import MAX_NAME_CHARS, name_problem

MAX_NPZ_MEMBERS = 64
MAX_CSV_COLUMNS = 100_000
NPZ_KEYS = ("x", "y", "x_val", "y_val", "x_test", "y_test", "class_names")


def npz_info(shapes: dict[str, tuple[int, ...]], ignored: list[str]) -> dict[str, Any]:
    """The upload's info (ignored arrays, warnings) once 'x' is known to be there and not channels-last.

    `shapes` maps each known array the file holds to its shape (from its header).
    """
    if "x" not in shapes:
        raise DatasetError(
            f"the NPZ file has no array 'x' (it has: {', '.join(sorted(list(shapes) + ignored)) or 'none'})"
        )
    warnings = npz_x_notes(shapes["x"])
    info: dict[str, Any] = {}
    if ignored:
        info["ignored_arrays"] = ignored
    if warnings:
        info["warnings"] = warnings
    return info


def npz_x_notes(shape: tuple[int, ...]) -> list[str]:
    """Refuse channels-last images; warn about 3-D arrays."""
    warnings = []
    if len(shape) == 4 and shape[1] not in (1, 2, 3, 4) and shape[3] in (1, 3, 4):
        raise DatasetError(
            f"'x' has shape {shape}, which looks channels-last (N, H, W, C); "
            "save images channels-first (N, C, H, W), e.g. np.transpose(x, (0, 3, 1, 2))"
        )
    if len(shape) == 3:
        warnings.append(
            f"'x' has shape {shape}: treated as feature arrays; save images as (N, 1, H, W) for image models"
        )
    return warnings


def npz_class_names(arrays: dict[str, np.ndarray]) -> list[str] | None:
    """Refuse string labels; the optional 'class_names' array as Python strings."""
    for key in ("y", "y_val", "y_test"):
        if key in arrays and arrays[key].dtype.kind in "USO":
            raise DatasetError(
                f"'{key}' holds strings; store integer labels and put the names in a 'class_names' array"
            )
    if "class_names" not in arrays:
        return None
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DatasetError("'class_names' must be a 1-D array of strings")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    except UnicodeDecodeError as exc:
        raise DatasetError("'class_names' is not valid UTF-8 text") from exc


def read_npy_header(f: Any, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a .npy header, read without touching the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DatasetError(f"array '{key}' uses an unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def check_npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    """Read every member's .npy header: refuse object arrays and oversized class lists before allocating.

    Returns {array name: (shape, Fortran order, dtype)}. There is no cap on the arrays' size: they are
    streamed to disk in chunks, never held whole.
    """
    if not zipfile.is_zipfile(path):
        raise DatasetError(
            "the file is not an NPZ archive (save it with numpy.savez or numpy.savez_compressed)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise DatasetError(
                    f"the NPZ file holds {len(infos)} arrays; at most {MAX_NPZ_MEMBERS} are allowed"
                )
            headers: dict[str, tuple[tuple[int, ...], bool, np.dtype]] = {}
            for info in infos:
                key = info.filename.removesuffix(".npy")
                problem = name_problem(key, "an array name in the NPZ file")
                if problem:
                    raise DatasetError(problem)
                if not info.filename.endswith(".npy"):
                    raise DatasetError(f"the NPZ file holds '{info.filename}', which is not a .npy array")
                with zf.open(info) as f:
                    shape, fortran, dtype = read_npy_header(f, key)
                if dtype.hasobject:
                    raise DatasetError(
                        f"array '{key}' holds Python objects, which would have to be unpickled; "
                        "refused for safety: store plain numeric or string arrays"
                    )
                if dtype.names is not None:
                    raise DatasetError(f"array '{key}' is a structured (record) array; store plain arrays")
                if key == "class_names":
                    check_class_names_header(shape, dtype)
                headers[key] = (shape, fortran, dtype)
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read the NPZ file: {exc}") from exc
    return headers


def check_class_names_header(shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a 'class_names' array too long or too wide from its header, before a byte of it is loaded.

    A string array's width is its longest element (4 bytes a character for str, up to 4 UTF-8 bytes
    a character for bytes), so one 20-million-character name shows here as an 80 MB item size.
    """
    count = math.prod(shape)
    if count > limits.MAX_CLASSES:
        raise DatasetError(f"'class_names' lists {count} classes; at most {limits.MAX_CLASSES} are supported")
    if dtype.kind in "US" and dtype.itemsize > 4 * MAX_NAME_CHARS:
        chars = dtype.itemsize // 4 if dtype.kind == "U" else dtype.itemsize
        raise DatasetError(
            f"'class_names' holds names up to {chars:,} {'characters' if dtype.kind == 'U' else 'bytes'} "
            f"long; at most {MAX_NAME_CHARS} characters a name are allowed"
        )


@contextlib.contextmanager
def open_csv(path: Path, options: dict[str, Any]):
    """(header, label index or None, feature indices, iterator of (line, feature values, label), position).

    Rows are checked as they are read (field count, numbers, labels); the caller keeps what it needs;
    `position()` is how many bytes of the file have been read. Errors are DatasetErrors with the row
    and line. There is no size cap: the store ingests rows in chunks.
    """
    explicit = "label_column" in options
    label_column = options.get("label_column", "label")
    if not isinstance(label_column, str) or not label_column:
        raise DatasetError(f"dataset option 'label_column' must be a column name, got {label_column!r}")
    problem = name_problem(label_column, "dataset option 'label_column'")
    if problem:
        raise DatasetError(problem)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader, header, label_idx, feat_idx = _csv_header(f, label_column, explicit)
            # Bytes read so far (ahead of the rows by one buffer): for progress reports.
            position = f.buffer.tell
            yield header, label_idx, feat_idx, _csv_rows(reader, header, label_idx, feat_idx), position
    except UnicodeDecodeError as exc:
        raise DatasetError("the CSV file is not UTF-8 text") from exc
    except csv.Error as exc:
        raise DatasetError(f"the CSV file is malformed: {exc}") from exc


def _csv_header(
    f: io.TextIOBase, label_column: str, explicit: bool
) -> tuple[Any, list[str], int | None, list[int]]:
    sample = f.read(65536)
    f.seek(0)
    try:
        dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(f, dialect)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DatasetError("the CSV file is empty; its first line must name the columns")
    header = [h.strip() for h in header]
    if len(header) > MAX_CSV_COLUMNS:
        raise DatasetError(f"the CSV file has {len(header)} columns; at most {MAX_CSV_COLUMNS} are allowed")
    if all(_is_number(h) for h in header):
        raise DatasetError("the CSV file's first line must name the columns, but it holds numbers")
    seen = set()
    for i, h in enumerate(header):
        problem = name_problem(h, f"the name of CSV column {i + 1}")
        if problem:
            raise DatasetError(problem)
        if h in seen:
            raise DatasetError(f"the CSV header names column '{h}' twice")
        seen.add(h)
    label_idx = _find_column(header, label_column)
    if label_idx is None and explicit:
        raise DatasetError(
            f"the CSV file has no label column '{label_column}' (columns: {', '.join(header[:20])})"
        )
    feat_idx = [i for i in range(len(header)) if i != label_idx]
    if not feat_idx:
        raise DatasetError("the CSV file has no feature columns besides the label")
    return reader, header, label_idx, feat_idx


def _csv_rows(
    reader: Any, header: list[str], label_idx: int | None, feat_idx: list[int]
) -> Iterator[tuple[int, list[float], str | None]]:
    n = 0
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise DatasetError(
                f"line {line} of the CSV file has {len(row)} fields but the header has {len(header)}"
            )
        try:
            row_values = [float(row[i]) for i in feat_idx]
        except ValueError:
            for i in feat_idx:
                if not _is_number(row[i]):
                    raise DatasetError(
                        f"column '{header[i]}' is not numeric: row {n + 1} (line {line}) "
                        f"holds {row[i][:40]!r}"
                    ) from None
            raise DatasetError(f"line {line} of the CSV file could not be read as numbers") from None
        label = None
        if label_idx is not None:
            label = row[label_idx].strip()
            if not label:
                raise DatasetError(f"row {n + 1} (line {line}) has an empty '{header[label_idx]}' label")
            if len(label) > MAX_NAME_CHARS:  # refused at once: a class name (or number) this long is no label
                raise DatasetError(
                    f"row {n + 1} (line {line}) has a '{header[label_idx]}' label of {len(label):,} "
                    f"characters; a label is at most {MAX_NAME_CHARS}"
                )
        n += 1
        yield line, row_values, label


def csv_nonfinite_message(column: str, value: float, row: int, line: int) -> str:
    return (
        f"column '{column}' holds {value} at row {row + 1} (line {line}); "
        "missing or infinite values are not allowed"
    )


def csv_fingerprint_options(header: list[str], label_idx: int | None) -> dict[str, Any]:
    return {"label_column": header[label_idx] if label_idx is not None else None}


def csv_info(header: list[str], label_idx: int | None, feat_idx: list[int]) -> dict[str, Any]:
    info: dict[str, Any] = {"feature_names": [header[i] for i in feat_idx]}
    if label_idx is not None:
        info["label_column"] = header[label_idx]
    return info


def _find_column(header: list[str], name: str) -> int | None:
    if name in header:
        return header.index(name)
    folded = [i for i, h in enumerate(header) if h.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class CsvLabels:
    """Labels collected row by row as ids into the distinct values seen: memory per row is 8 bytes.

    A CSV of millions of rows has few distinct labels; keeping each row's label string would cost
    ~60 bytes a row. More than 2 * MAX_CLASSES distinct values cannot be a valid label column.
    """

    def __init__(self, column: str) -> None:
        self.column = column
        self.ids = array("q")
        self.values: dict[str, int] = {}

    def add(self, label: str) -> None:
        i = self.values.get(label)
        if i is None:
            if len(self.values) >= 2 * limits.MAX_CLASSES:
                raise DatasetError(
                    f"the label column '{self.column}' has more than {2 * limits.MAX_CLASSES} distinct values; "
                    f"at most {limits.MAX_CLASSES} classes"
                )
            i = self.values[label] = len(self.values)
        self.ids.append(i)


def csv_labels(labels: CsvLabels, lines: Any) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels index the classes; any non-numeric label makes them all class names (sorted).

    `lines[i]` is the file line of row i, for messages that name the first offending row.
    """
    distinct = list(labels.values)
    ids = np.frombuffer(labels.ids, dtype=np.int64)

    def first_row(bad_values: np.ndarray) -> int:
        return int(np.flatnonzero(np.isin(ids, np.flatnonzero(bad_values)))[0])

    if all(_is_number(v) for v in distinct):
        numbers = np.array([float(v) for v in distinct])
        nums = numbers[ids]
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
        if bad.any():
            i = first_row(bad)
            raise DatasetError(
                f"labels must be integers or class names; row {i + 1} (line {lines[i]}) has {distinct[ids[i]]!r}"
            )
        if nums.max() >= limits.MAX_CLASSES:
            i = int(np.argmax(nums))
            raise DatasetError(
                f"label {distinct[ids[i]]!r} on line {lines[i]} is too large: at most {limits.MAX_CLASSES} classes"
            )
        if nums.min() < 0:
            i = int(np.argmin(nums))
            raise DatasetError(f"labels must be >= 0; row {i + 1} (line {lines[i]}) has {distinct[ids[i]]!r}")
        return nums.astype(np.int64), None
    names = sorted(distinct)
    if len(names) > limits.MAX_CLASSES:
        raise DatasetError(
            f"the label column has {len(names)} distinct values; at most {limits.MAX_CLASSES} classes"
        )
    index = {n: i for i, n in enumerate(names)}
    rank = np.array([index[v] for v in distinct], dtype=np.int64)
    return rank[ids], names
