"""Soft-label teachers: a file of predictions (`index` + `logits` or `probs`) for a dataset's samples.

The file refers to samples by the dataset's stable index (the store's row number, listed by
`GET /api/datasets/{id}/index/`). A distillation with such a teacher reads, for each split, the rows
of its samples; a sample the file does not cover gets NaN logits, which the distill step reads as "no
prediction": that sample trains on its label only (`kd_core.losses.kd_loss`, `covered`). An unlabeled
transfer set must be covered whole. The teacher has no model, so it cannot score augmented inputs.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_core import limits
from kd_core.errors import CheckpointError, ConfigError, DatasetError

# A soft-label file is read whole into memory: bound it (1 GiB of float32 logits).
MAX_VALUES = 2**28
PROBS_TOLERANCE = 1e-3  # |sum of a probs row - 1|; float16 probabilities round to about this
FLOAT_KINDS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class SoftLabels:
    """Validated predictions: store row `index` (int64, sorted, unique) and their float32 `logits`."""

    index: np.ndarray
    logits: np.ndarray
    source: str  # "logits" or "probs"

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    from kd_core.data.tables import check_npz_headers

    try:
        headers = check_npz_headers(path)
    except DatasetError as exc:
        raise CheckpointError(f"soft labels: {exc}") from None
    return {k: (shape, dtype) for k, (shape, _fortran, dtype) in headers.items()}


def read_soft_labels(
    path: str | Path, *, num_samples: int | None = None, num_classes: int | None = None
) -> SoftLabels:
    """Read and check a soft-label NPZ: headers first (shapes, dtypes, size), then the values.

    `num_samples` (the dataset's sample count) bounds the indices; `num_classes` must equal the
    predictions' class count when given. Errors are `CheckpointError`s in words.
    """
    path = Path(path)
    headers = _headers(path)
    if "index" not in headers:
        raise CheckpointError("soft labels need an 'index' array: each row's sample index in the dataset")
    kinds = [k for k in ("logits", "probs") if k in headers]
    if len(kinds) != 1:
        raise CheckpointError(
            "soft labels need exactly one of 'logits' or 'probs' (an N×C array beside 'index'); "
            f"the file holds {', '.join(sorted(headers)) or 'nothing'}"
        )
    kind = kinds[0]
    (ishape, idtype), (vshape, vdtype) = headers["index"], headers[kind]
    if len(ishape) != 1 or idtype.kind not in "iu":
        raise CheckpointError(f"'index' must be a 1-D integer array (int64); got shape {ishape} of {idtype}")
    if len(vshape) != 2 or vdtype not in FLOAT_KINDS:
        raise CheckpointError(
            f"'{kind}' must be a 2-D float16/float32 array (N×C); got shape {vshape} of {vdtype}"
        )
    n, c = vshape
    if ishape[0] != n:
        raise CheckpointError(f"'index' has {ishape[0]} rows but '{kind}' has {n}")
    if n == 0:
        raise CheckpointError("the soft-label file holds no predictions")
    if c < 2 or c > limits.MAX_CLASSES:
        raise CheckpointError(f"'{kind}' has {c} classes; between 2 and {limits.MAX_CLASSES} are supported")
    if n * c > MAX_VALUES:
        raise CheckpointError(f"'{kind}' holds {n * c:,} values; at most {MAX_VALUES:,} are supported")
    if num_samples is not None and n > num_samples:
        raise CheckpointError(f"the file has {n} predictions but the dataset only {num_samples} samples")
    if num_classes is not None and c != num_classes:
        raise CheckpointError(f"the predictions have {c} classes but the dataset has {num_classes}")
    try:
        with np.load(path, allow_pickle=False) as z:
            index = np.asarray(z["index"]).astype(np.int64, copy=False)
            values = np.asarray(z[kind]).astype(np.float32, copy=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read the soft-label file: {exc}") from None
    return _check_values(index, values, kind, num_samples)


def _check_values(index: np.ndarray, values: np.ndarray, kind: str, num_samples: int | None) -> SoftLabels:
    if index.min() < 0 or (num_samples is not None and index.max() >= num_samples):
        bad = int(index.min()) if index.min() < 0 else int(index.max())
        top = f" 0..{num_samples - 1}" if num_samples is not None else " non-negative"
        raise CheckpointError(f"'index' holds {bad}, outside the dataset's sample indices{top}")
    order = np.argsort(index, kind="stable")
    index, values = index[order], values[order]
    dupes = np.flatnonzero(index[1:] == index[:-1])
    if len(dupes):
        raise CheckpointError(f"'index' lists sample {int(index[dupes[0]])} more than once; each index once")
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        row = int(order[np.flatnonzero(~finite)[0]])
        raise CheckpointError(f"'{kind}' row {row} holds a non-finite value (NaN or inf)")
    if kind == "probs":
        if (values < 0).any():
            raise CheckpointError("'probs' holds negative values; probabilities are in [0, 1]")
        sums = values.sum(axis=1)
        off = np.flatnonzero(np.abs(sums - 1.0) > PROBS_TOLERANCE)
        if len(off):
            row = int(order[off[0]])
            raise CheckpointError(
                f"'probs' row {row} sums to {float(sums[off[0]]):.4f}, not 1 (±{PROBS_TOLERANCE}); "
                "give probabilities, or raw scores as 'logits'"
            )
        # Log-probabilities are logits (softmax gives the probabilities back); a zero becomes a very
        # negative but finite logit, so no -inf reaches a loss.
        values = np.log(np.maximum(values, 1e-12)).astype(np.float32)
    return SoftLabels(index=index, logits=values, source=kind)


def split_rows(dataset: Any, split: str) -> np.ndarray | None:
    """The store row of each sample of a split, in the split's order (None: a dataset without a store)."""
    view = getattr(dataset, f"x_{split}", None)
    index = getattr(view, "index", None)
    return None if index is None else np.asarray(index, dtype=np.int64)


def coverage_of(labels: SoftLabels, rows: np.ndarray) -> float:
    """Fraction of `rows` (store rows of a split) that have a prediction."""
    if len(rows) == 0:
        return 0.0
    return float(np.isin(rows, labels.index, assume_unique=False).mean())


class SoftLabelTeacher:
    """A teacher that is a file of predictions; quacks like `kd_core.checkpoints.Teacher` where a run needs it.

    `bind(dataset)` ties it to the dataset it refers to (input shape, class count, coverage); the logit
    cache then asks `split_logits(dataset, split, idx)` for the rows of each batch of a split.
    """

    soft_labels = True
    module = None
    num_params = None
    device = torch.device("cpu")

    def __init__(self, labels: SoftLabels, fingerprint: str) -> None:
        self.labels = labels
        self.fingerprint = fingerprint
        self.num_classes = labels.num_classes
        self.input_shape: tuple[int, ...] | None = None
        self.coverage: float | None = None

    def bind(self, dataset: Any) -> None:
        """Check the file against `dataset` and note its train coverage; CheckpointError/ConfigError in words."""
        if split_rows(dataset, "train") is None:
            raise CheckpointError(
                "a soft-label teacher refers to a dataset's stable sample index, which a built-in dataset "
                "does not have: upload or import the data as a dataset first"
            )
        n_rows = _store_rows(dataset)
        if n_rows is not None and int(self.labels.index.max()) >= n_rows:
            raise CheckpointError(
                f"the soft labels name sample {int(self.labels.index.max())}; the dataset has {n_rows}"
            )
        if dataset.num_classes is not None and dataset.num_classes != self.num_classes:
            raise CheckpointError(
                f"the soft labels have {self.num_classes} classes but the dataset has {dataset.num_classes}"
            )
        self.input_shape = tuple(int(d) for d in dataset.input_shape)
        self.coverage = coverage_of(self.labels, split_rows(dataset, "train"))
        if dataset.num_classes is None and self.coverage < 1.0:
            raise ConfigError(
                f"the soft labels cover {self.coverage:.1%} of this unlabeled transfer set's training samples; "
                "without labels every training sample needs a prediction"
            )

    def split_logits(self, dataset: Any, split: str, idx: Tensor) -> Tensor:
        """float32 logits (len(idx), C) of split positions `idx`; NaN rows where the file has no prediction."""
        rows = split_rows(dataset, split)[np.asarray(idx.cpu(), dtype=np.int64)]
        pos = np.searchsorted(self.labels.index, rows)
        pos = np.minimum(pos, len(self.labels.index) - 1)
        found = self.labels.index[pos] == rows
        out = np.full((len(rows), self.num_classes), np.nan, dtype=np.float32)
        out[found] = self.labels.logits[pos[found]]
        return torch.from_numpy(out)

    def logits(self, x: Tensor) -> Tensor:
        raise ConfigError(
            "a soft-label teacher is a file of predictions for the dataset's samples: it cannot score "
            "new inputs (augmented batches); use augment 'none'"
        )

    def to(self, device: Any) -> SoftLabelTeacher:
        return self

    def eval(self) -> SoftLabelTeacher:
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> SoftLabelTeacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _store_rows(dataset: Any) -> int | None:
    total = 0
    for split in ("train", "val", "test"):
        rows = split_rows(dataset, split)
        if rows is not None and len(rows):
            total = max(total, int(rows.max()) + 1)
    return total or None


def load_soft_label_teacher(path: str | Path, *, num_classes: int | None = None) -> SoftLabelTeacher:
    """Read a soft-label NPZ as a teacher (bind it to its dataset before use)."""
    path = Path(path)
    labels = read_soft_labels(path, num_classes=num_classes)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return SoftLabelTeacher(labels, "soft-labels:" + digest.hexdigest())
