"""The built-in datasets: scikit-learn's digits and a seeded synthetic set; nothing is downloaded."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kd_core.data.dataset import RawData
from kd_core.data.options import float_option, int_option
from kd_core.errors import DatasetError

BUILTIN_DATASETS = ("digits", "synthetic")


def load_builtin(name: str, options: dict[str, Any]) -> RawData:
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(options)
    raise DatasetError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")


def _digits() -> RawData:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    bunch = load_digits()
    # Pixels are counts 0..16 in the original data.
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return RawData(
        name="digits",
        format="builtin",
        x=x,
        y=bunch.target.astype(np.int64),
        class_names=[str(c) for c in bunch.target_names],
        is_image=True,
        info={"source": "scikit-learn load_digits (8x8, 1,797 images)"},
    )


def _synthetic(options: dict[str, Any]) -> RawData:
    from sklearn.datasets import make_classification

    n_classes = int_option(options, "n_classes", 4, 2, 1000)
    n_features = int_option(options, "n_features", 20, 1, 10_000)
    n_samples = int_option(options, "n_samples", 2000, 2 * n_classes, 1_000_000)
    label_noise = float_option(options, "label_noise", 0.0, 0.0, 1.0)
    seed = int_option(options, "seed", 0, 0, 2**31 - 1)
    if n_features * n_samples * 4 > 2 * 1024**3:
        raise DatasetError("synthetic data of that size would exceed 2 GiB; lower n_samples or n_features")
    # Half the features carry the signal, enough that every class gets its own cluster corner.
    n_informative = min(n_features, max(math.ceil(math.log2(n_classes)) + 1, n_features // 2))
    if 2**n_informative < n_classes:
        raise DatasetError(
            f"{n_classes} synthetic classes need at least {math.ceil(math.log2(n_classes))} features"
        )
    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=min(2, n_features - n_informative),
        n_classes=n_classes,
        n_clusters_per_class=1,
        flip_y=0.0,  # noise is ours, on the training split only
        random_state=seed,
    )
    params = {
        "n_samples": n_samples,
        "n_features": n_features,
        "n_classes": n_classes,
        "label_noise": label_noise,
        "seed": seed,
    }
    return RawData(
        name="synthetic",
        format="builtin",
        x=x.astype(np.float32),
        y=y.astype(np.int64),
        class_names=[str(i) for i in range(n_classes)],
        fingerprint_options=params,
        train_label_noise=label_noise,
        noise_seed=seed,
        info={"source": "seeded scikit-learn make_classification", "options": params},
    )
