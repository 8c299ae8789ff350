"""The Dataset object (in memory, or rows of a memory-mapped store) and the checks, splits and statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_core.errors import DatasetError
from kd_core.limits import MAX_CLASSES, name_problem

if TYPE_CHECKING:
    import torch

# MAX_CLASSES (imported above) and the name bounds live in kd_core/limits.py, shared with the web app.
# Uploaded data has no size cap: it is streamed into an on-disk store (kd_core/data/store.py).
# A std below this is a constant feature: dividing by it would blow noise up, so it is taken as 1.
STD_FLOOR = 1e-6
SPLITS = ("train", "val", "test")
# Rows read at once when a store's split is scanned (statistics, materialising): about this many bytes.
SCAN_BYTES = 32 * 1024**2


@dataclass
class RawData:
    """What a loader read from its source, before validation, splitting and statistics."""

    name: str
    format: str
    x: Any
    y: Any = None
    # None means "not given by the file": carved from x/y. An array (even empty) is used as is.
    x_val: Any = None
    y_val: Any = None
    x_test: Any = None
    y_test: Any = None
    class_names: list[str] | None = None
    is_image: bool = False
    # Options that changed the arrays (image_size, synthetic parameters): part of the fingerprint.
    fingerprint_options: dict[str, Any] = field(default_factory=dict)
    # Fraction of training labels to flip after splitting (synthetic data only).
    train_label_noise: float = 0.0
    noise_seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class RowFile:
    """Rows of a C-order .npy file read with pread: thread-safe, and no page of it mapped into the process.

    Reading through a memory map would count every page touched as the reader's RSS (a 4.5 GB store
    read once would show as 4.5 GB resident); pread copies only the rows asked for.
    """

    # Row buffers per preadv call (IOV_MAX is 1024 on Linux).
    IOV = 512

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise DatasetError("the dataset store's x.npy is not in C order")
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._file: Any = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}  # reopened where unpickled

    def _fd(self) -> int:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115  # held for the object's life
        return self._file.fileno()

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order, repeats allowed) in that order; each run of consecutive rows is one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows) or not self.row_bytes:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row index out of range for a store of {len(self)} samples")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        flat = out.reshape(len(rows), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        fd = self._fd()
        for s, e in zip([0, *breaks.tolist()], [*breaks.tolist(), len(srt)]):
            for a in range(s, e, self.IOV):
                b = min(e, a + self.IOV)
                got = os.preadv(
                    fd, [flat[k] for k in order[a:b].tolist()], self.offset + int(srt[a]) * self.row_bytes
                )
                if got != (b - a) * self.row_bytes:
                    raise DatasetError("the dataset store's x.npy is truncated")
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, min(stop, len(self))))


class SplitView:
    """Rows `index` of a memory-mapped store array, seen as the float32 model inputs (raw * scale).

    Indexing returns float32 arrays; `raw(idx)` returns the stored dtype (uint8 pixels, float32
    features) for loaders. numpy functions see the whole split as float32 (np.asarray), which is
    only sensible for small data: training reads batches through Dataset.read.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, base: np.ndarray | RowFile, index: np.ndarray, scale: float) -> None:
        self.base, self.index, self.scale = base, np.asarray(index, dtype=np.int64), float(scale)
        self.shape = (len(self.index), *base.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.index)

    def raw(self, idx: Any) -> np.ndarray:
        """Rows idx (positions in this split, any order) in the stored dtype, read in file order."""
        rows = self.index[idx]
        if isinstance(self.base, RowFile):
            return self.base.read_rows(rows.reshape(-1)).reshape(*rows.shape, *self.shape[1:])
        if rows.ndim == 0:
            return np.asarray(self.base[int(rows)])
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.base.shape[1:]), dtype=self.base.dtype)
        if len(rows):
            out[order] = self.base[rows[order]]
        return out

    def to_float(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32)
        return x if self.scale == 1.0 else x * np.float32(self.scale)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            return np.asarray(self)[key]
        return self.to_float(self.raw(np.arange(len(self))[key]))

    def chunks(self, scan_bytes: int | None = None) -> Iterator[np.ndarray]:
        """The split's raw rows in split order, a few MiB at a time."""
        step = max(
            1, (scan_bytes or SCAN_BYTES) // max(1, self.base.dtype.itemsize * math.prod(self.shape[1:]))
        )
        for start in range(0, len(self), step):
            yield self.raw(np.arange(start, min(start + step, len(self))))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        start = 0
        for raw in self.chunks():
            out[start : start + len(raw)] = self.to_float(raw)
            start += len(raw)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        # ndarray methods (mean, std, reshape, ...) on the whole split as float32: small data only.
        if name.startswith("_") or name in ("base", "index", "scale", "shape", "ndim"):
            raise AttributeError(name)  # not set yet (unpickling): never materialise for these
        return getattr(np.asarray(self), name)


@dataclass
class Dataset:
    """A dataset split three ways. Inputs are RAW: the model applies `preprocessing` itself.

    In memory (built-in data), x arrays are float32 of shape (N, *input_shape). Over a store, they
    are SplitViews of the memory-mapped store: stored as uint8 pixels or float32 features, read a
    batch at a time (`read`), and model input = x.astype(float32) * x_scale. y arrays are int64 of
    shape (N,), or None for an unlabelled transfer set. `preprocessing` holds the training split's
    mean and std (of the model inputs) as lists with one value per entry of the first input axis:
    per channel for images (N, C, H, W), per feature for vectors (N, F).
    """

    name: str
    format: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    class_names: list[str]
    num_classes: int | None
    input_shape: tuple[int, ...]
    is_image: bool
    preprocessing: dict[str, Any]
    fingerprint: str
    # Loader notes shown by inspection: skipped files, feature names, the label column.
    info: dict[str, Any] = field(default_factory=dict)
    # model input = stored x as float32 * x_scale (1/255 for a store's uint8 pixels of a ZIP or folder).
    x_scale: float = 1.0
    # The store directory the splits are rows of, or None for data held in memory.
    store_path: str | None = None

    @property
    def labeled(self) -> bool:
        return self.y_train is not None

    @property
    def x_dtype(self) -> str:
        """The stored dtype of x: 'uint8' (pixels) or 'float32'."""
        x = self.x_train
        return str(x.base.dtype) if isinstance(x, SplitView) else "float32"

    def split_size(self, split: str) -> int:
        return len(self.split(split)[0])

    def read(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows idx of a split (in idx order), x in the stored dtype (see x_dtype, x_scale), y int64 or None."""
        x, y = self.split(split)
        idx = np.asarray(idx, dtype=np.int64)
        xs = x.raw(idx) if isinstance(x, SplitView) else np.asarray(x[idx])
        return xs, None if y is None else y[idx]

    def nbytes_float32(self, split: str) -> int:
        """What holding the split as float32 would take."""
        return self.split_size(split) * math.prod(self.input_shape) * 4

    @property
    def num_samples(self) -> int:
        return len(self.x_train) + len(self.x_val) + len(self.x_test)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def tensors(self, split: str, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The split as tensors on `device`: small datasets are held there whole during training."""
        import torch  # deferred so inspecting an upload in a web process stays light

        x, y = self.split(split)
        xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32))).to(device)
        yt = None if y is None else torch.from_numpy(np.ascontiguousarray(y)).to(device)
        return xt, yt

    def class_counts(self) -> list[int]:
        """Training examples per class; empty for a transfer set or an unknown class count."""
        if self.y_train is None or self.num_classes is None:
            return []
        return [int(c) for c in np.bincount(self.y_train, minlength=self.num_classes)]

    def empty_classes(self) -> list[str]:
        """Names of classes with no training example: reported to the user, not refused."""
        counts = self.class_counts()
        return [self.class_names[i] for i, c in enumerate(counts) if c == 0]

    def with_num_classes(self, n: int) -> Dataset:
        """This dataset with its class count fixed, e.g. from the teacher of a transfer set."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > MAX_CLASSES:
            raise DatasetError(f"the number of classes must be an integer from 1 to {MAX_CLASSES}, got {n!r}")
        if self.num_classes is not None:
            if n != self.num_classes:
                raise DatasetError(
                    f"the model predicts {n} classes but dataset '{self.name}' has {self.num_classes}"
                )
            return self
        names = list(self.class_names) if len(self.class_names) == n else [str(i) for i in range(n)]
        return dataclasses.replace(self, num_classes=n, class_names=names)


def check_x(x: Any, key: str, *, allow_empty: bool = False) -> np.ndarray:
    """Numeric, finite, at least 2-D samples as float32; errors name the array and the sample."""
    x = np.asarray(x)
    check_x_layout(x.shape, x.dtype, key, allow_empty=allow_empty)
    x = x.astype(np.float32, copy=False)
    check_finite(x, key)
    return x


def check_x_layout(shape: tuple[int, ...], dtype: np.dtype, key: str, *, allow_empty: bool = False) -> None:
    """check_x's checks that need only the header: type, rank, emptiness and size."""
    if dtype.kind not in "biuf":
        raise DatasetError(f"'{key}' must hold numbers, but its type is {dtype}")
    if len(shape) < 2:
        raise DatasetError(
            f"'{key}' must have shape (samples, features...), got shape {tuple(shape)}; "
            "reshape a single feature to (N, 1)"
        )
    if shape[0] == 0 and not allow_empty:
        raise DatasetError(f"'{key}' has no samples")


def check_finite(x: np.ndarray, key: str, offset: int = 0) -> None:
    """Refuse NaN/inf in float32 samples `x`, which start at sample `offset` of array `key`."""
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        bad = offset + int(np.flatnonzero(~finite)[0])
        raise DatasetError(f"'{key}' contains NaN or infinite values (first in sample {bad})")


def check_labels(y: Any, key: str, n: int) -> np.ndarray:
    """Non-negative integer labels, one per sample, as int64."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(
            f"'{key}' must be 1-D (one integer label per sample), got shape {tuple(y.shape)}; "
            "one-hot labels must be converted with argmax"
        )
    if len(y) != n:
        raise DatasetError(f"'{key}' has {len(y)} labels but its inputs have {n} samples")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"'{key}' must hold integer labels, found {y[i].item()!r} at index {i}")
    elif y.dtype.kind not in "biu":
        raise DatasetError(f"'{key}' must hold integer labels, but its type is {y.dtype}")
    if len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise DatasetError(f"'{key}' has a negative label {y[i].item()!r} at index {i}; labels count from 0")
    if len(y) and y.max() >= MAX_CLASSES:
        raise DatasetError(
            f"'{key}' has label {y.max().item()!r}: at most {MAX_CLASSES} classes are supported"
        )
    return y.astype(np.int64)


def check_class_names(names: Any) -> list[str]:
    """At most MAX_CLASSES distinct names of at most MAX_NAME_CHARS characters each, never truncated."""
    names = [str(n) for n in names]
    if not names:
        raise DatasetError("'class_names' is empty")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"'class_names' lists {len(names)} classes; at most {MAX_CLASSES} are supported")
    for i, name in enumerate(names):
        problem = name_problem(name, f"class name {i}")
        if problem:
            raise DatasetError(problem)
    seen: set[str] = set()
    for name in names:  # one pass: a scan per name would be quadratic in 10,000 names
        if name in seen:
            raise DatasetError(f"'class_names' lists {name!r} more than once")
        seen.add(name)
    return names


def check_split(
    split: str, shape: tuple[int, ...], x_shape: tuple[int, ...], ys: Any, labeled: bool
) -> np.ndarray | None:
    """Checks a given val/test split (its x already checked) against 'x'; its checked labels, or None."""
    if shape[1:] != x_shape[1:]:
        raise DatasetError(
            f"'x_{split}' samples have shape {shape[1:]} but 'x' samples have shape {x_shape[1:]}"
        )
    if labeled and ys is None:
        raise DatasetError(f"'x_{split}' needs its labels 'y_{split}' because 'x' has labels 'y'")
    if not labeled and ys is not None:
        raise DatasetError(f"'y_{split}' is given but 'x' has no labels 'y'")
    return check_labels(ys, f"y_{split}", shape[0]) if labeled else None


def resolve_classes(class_names: Any, labels: list[np.ndarray] | None) -> tuple[list[str], int | None]:
    """Checked class names and the class count; labels (all splits' checked labels) is None when unlabeled."""
    names = check_class_names(class_names) if class_names is not None else None
    num_classes: int | None = len(names) if names is not None else None
    if labels is not None:
        top = max(int(a.max()) for a in labels if len(a))
        if num_classes is None:
            num_classes = top + 1
        elif top >= num_classes:
            raise DatasetError(
                f"label {top} does not index 'class_names', which lists {num_classes} classes (0 to {num_classes - 1})"
            )
    if names is None:
        names = [str(i) for i in range(num_classes)] if num_classes is not None else []
    return names, num_classes


def build_dataset(raw: RawData, *, seed: int, val_fraction: float, test_fraction: float) -> Dataset:
    """Validate what a loader read, carve missing splits, add label noise, statistics and fingerprint."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 0.9):
        raise DatasetError(
            "val_fraction and test_fraction must be in [0, 1) and leave room for training data"
        )
    labeled = raw.y is not None
    x = check_x(raw.x, "x")
    y = check_labels(raw.y, "y", len(x)) if labeled else None
    given: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split in ("val", "test"):
        xs, ys = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if xs is None:
            if ys is not None:
                raise DatasetError(f"'y_{split}' is given without 'x_{split}'")
            continue
        xs = check_x(xs, f"x_{split}", allow_empty=True)
        given[split] = (xs, check_split(split, xs.shape, x.shape, ys, labeled))

    labels = [y] + [v[1] for v in given.values()] if y is not None else None
    class_names, num_classes = resolve_classes(raw.class_names, labels)

    rng = np.random.default_rng(seed)
    missing = [s for s in ("val", "test") if s not in given]
    fractions = {"val": val_fraction, "test": test_fraction}
    parts = carve_splits(y, len(x), {s: fractions[s] for s in missing}, rng)
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, idx in parts.items():
        splits[name] = (x[idx], None if y is None else y[idx])
    splits.update(given)
    x_train, y_train = splits["train"]
    if raw.train_label_noise > 0 and y_train is not None:
        y_train = flip_labels(y_train, raw.train_label_noise, num_classes, raw.noise_seed)
        splits["train"] = (x_train, y_train)

    input_shape = tuple(int(d) for d in x.shape[1:])
    is_image = raw.is_image and len(input_shape) == 3
    mean, std = channel_stats(x_train)
    preprocessing = {"mean": mean.tolist(), "std": std.tolist()}
    fingerprint = compute_fingerprint(raw.format, splits, class_names, raw.fingerprint_options)
    return Dataset(
        name=raw.name,
        format=raw.format,
        x_train=x_train,
        y_train=y_train,
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        class_names=class_names,
        num_classes=num_classes,
        input_shape=input_shape,
        is_image=is_image,
        preprocessing=preprocessing,
        fingerprint=fingerprint,
        info=dict(raw.info),
    )


def _round(v: float) -> int:
    # Half up, not Python's half-to-even, so 0.5 of a sample rounds the same way everywhere.
    return int(math.floor(v + 0.5))


def carve_splits(
    y: np.ndarray | None, n: int, fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Seeded index sets for 'train' and each split in `fractions`; stratified by label where possible."""
    wanted = {s: _round(f * n) for s, f in fractions.items()}
    if n - sum(wanted.values()) < 1:
        raise DatasetError(f"{n} samples are too few to split into training, validation and test sets")
    out: dict[str, list[np.ndarray]] = {s: [] for s in ["train", *fractions]}
    counts = np.bincount(y) if y is not None else None
    present = np.flatnonzero(counts) if counts is not None else None
    needed = 1 + sum(1 for v in wanted.values() if v > 0)
    if counts is not None and counts[present].min() >= needed:
        # Each class keeps at least one training example; the split sizes match the plain case.
        spare = counts[present] - 1
        per_class: dict[str, np.ndarray] = {}
        for s, total in wanted.items():
            per_class[s] = _apportion(counts[present], total, spare, rng)
            spare = spare - per_class[s]
        for k, c in enumerate(present):
            idx = rng.permutation(np.flatnonzero(y == c))
            start = 0
            for s in fractions:
                take = int(per_class[s][k])
                out[s].append(idx[start : start + take])
                start += take
            out["train"].append(idx[start:])
    else:
        perm = rng.permutation(n)
        start = 0
        for s in fractions:
            out[s].append(perm[start : start + wanted[s]])
            start += wanted[s]
        out["train"].append(perm[start:])
    # Shuffled within each split so no split is ordered by class.
    return {s: rng.permutation(np.concatenate(parts)).astype(np.int64) for s, parts in out.items()}


def _apportion(counts: np.ndarray, total: int, cap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder), at most `cap` each."""
    ideal = counts * total / counts.sum()
    alloc = np.minimum(np.floor(ideal).astype(np.int64), cap)
    left = total - int(alloc.sum())
    # Largest remainder first; ties broken by a seeded draw, not by class order.
    order = np.lexsort((rng.permutation(len(counts)), -(ideal - alloc)))
    while left > 0:
        progressed = False
        for k in order:
            if left == 0:
                break
            if alloc[k] < cap[k]:
                alloc[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def flip_labels(y: np.ndarray, fraction: float, num_classes: int | None, seed: int) -> np.ndarray:
    """Exactly round(fraction * N) labels changed, each to a uniformly drawn *other* class."""
    if num_classes is None or num_classes < 2:
        return y
    rng = np.random.default_rng([seed, 0x0015E])
    k = _round(fraction * len(y))
    idx = rng.choice(len(y), size=k, replace=False)
    shift = rng.integers(1, num_classes, size=k)
    noisy = y.copy()
    noisy[idx] = (y[idx] + shift) % num_classes
    return noisy


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per entry of the first input axis (image channel or feature), chunked; std 1 below STD_FLOOR."""
    # About 128 MiB of float64 per chunk, whatever the sample size.
    chunk = max(1, 2**24 // max(1, math.prod(x.shape[1:])))
    return chunked_stats((x[s : s + chunk] for s in range(0, len(x), chunk)), x.shape[1])


def chunked_stats(chunks: Iterator[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """channel_stats over float chunks of the samples (N_k, C, ...), in one pass."""
    shape = (width,)
    count = 0
    mean = np.zeros(shape, dtype=np.float64)
    m2 = np.zeros(shape, dtype=np.float64)
    for chunk in chunks:
        if not len(chunk):
            continue
        part = chunk.astype(np.float64)
        axes = (0, *range(2, part.ndim))
        n_b = part.size // width
        mean_k = part.mean(axis=axes, keepdims=True)
        m2_b = ((part - mean_k) ** 2).sum(axis=axes)
        mean_b = mean_k.reshape(shape)
        # Chan et al.'s pairwise update: exact for any chunking, stable when mean >> std.
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    std = np.sqrt(m2 / max(count, 1))
    std = np.where(std < STD_FLOOR, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def split_stats(x: np.ndarray | SplitView) -> tuple[np.ndarray, np.ndarray]:
    """channel_stats of a split's model inputs; a store's split is scanned in chunks, never copied whole.

    uint8 pixels are counted per channel (a 256-bin histogram): exact, and several times faster
    than float arithmetic over hundreds of millions of pixels.
    """
    if not isinstance(x, SplitView):
        return channel_stats(x)
    width = x.shape[1]
    if x.base.dtype != np.uint8:
        return chunked_stats((x.to_float(raw) for raw in x.chunks()), width)
    hist = np.zeros((width, 256), dtype=np.int64)
    for raw in x.chunks():
        for c in range(width):
            hist[c] += np.bincount(raw[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist @ values) / np.maximum(count, 1)
    var = np.maximum((hist @ values**2) / np.maximum(count, 1) - mean**2, 0.0)
    mean, std = mean * x.scale, np.sqrt(var) * x.scale
    std = np.where(std < STD_FLOOR, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def compute_fingerprint(
    fmt: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
    class_names: list[str],
    options: dict[str, Any],
) -> str:
    """sha256 of the split arrays and what shaped them: equal fingerprints mean equal data."""
    streams = {
        name: (x.dtype.str, x.shape, iter([np.ascontiguousarray(x).data]), y)
        for name, (x, y) in splits.items()
    }
    return stream_fingerprint(fmt, streams, class_names, options)


def stream_fingerprint(
    fmt: str,
    splits: dict[str, tuple[str, tuple[int, ...], Iterator[Any], np.ndarray | None]],
    class_names: list[str],
    options: dict[str, Any],
) -> str:
    """compute_fingerprint with each split's x given as (dtype str, shape, C-order byte chunks, y)."""
    h = hashlib.sha256(b"kd-studio-data-v1\0")
    meta = {"format": fmt, "class_names": class_names, "options": options}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in SPLITS:
        dtype, shape, chunks, y = splits[name]
        h.update(f"\0{name}:{dtype}:{tuple(shape)}".encode())
        for chunk in chunks:
            h.update(chunk)
        if y is None:
            h.update(b"\0no-labels")
        else:
            h.update(f"\0y:{y.dtype.str}:{y.shape}".encode())
            h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()
