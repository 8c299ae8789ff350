"""The Dataset object and the checks, splits, statistics and fingerprint every loader shares."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_core.errors import DatasetError
from kd_core.limits import MAX_CLASSES, name_problem

if TYPE_CHECKING:
    import torch

# Caps on what an uploaded file may make us hold in memory; tests and deployments may lower them.
MAX_ARRAY_BYTES = 2 * 1024**3
# MAX_CLASSES (imported above) and the name bounds live in kd_core/limits.py, shared with the web app.
# A std below this is a constant feature: dividing by it would blow noise up, so it is taken as 1.
STD_FLOOR = 1e-6
SPLITS = ("train", "val", "test")


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


@dataclass
class Dataset:
    """A dataset split three ways. Arrays are RAW: the model applies `preprocessing` itself.

    x arrays are float32 of shape (N, *input_shape); y arrays are int64 of shape (N,), or
    None for an unlabelled transfer set. `preprocessing` holds the training split's mean and
    std as lists with one value per entry of the first input axis: per channel for images
    (N, C, H, W), per feature for vectors (N, F).
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

    @property
    def labeled(self) -> bool:
        return self.y_train is not None

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
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
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
    if math.prod(shape) * 4 > MAX_ARRAY_BYTES:
        raise DatasetError(f"'{key}' is too large: at most {MAX_ARRAY_BYTES // 1024**2} MiB as float32")


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
    axes = (0, *range(2, x.ndim))
    shape = (x.shape[1],)
    # About 128 MiB of float64 per chunk, whatever the sample size.
    chunk = max(1, 2**24 // max(1, math.prod(x.shape[1:])))
    count = 0
    mean = np.zeros(shape, dtype=np.float64)
    m2 = np.zeros(shape, dtype=np.float64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64)
        n_b = part.size // max(1, math.prod(shape))
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
