"""bench/synthetic_images.py's generated set and a tiny end-to-end run of bench/bench_quality.py (behaviour only)."""

from __future__ import annotations

import json

import numpy as np

from bench import bench_quality
from bench.common import RESULTS
from bench.synthetic_images import CLASSES, class_recipe, image_dataset, make_images


def test_images_are_seeded_cifar_shaped_and_balanced() -> None:
    x, y = make_images(40, seed=3)
    again, y_again = make_images(40, seed=3)
    other, _ = make_images(40, seed=4)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x, again) and np.array_equal(y, y_again)
    assert not np.array_equal(x, other)
    assert np.bincount(y, minlength=CLASSES).tolist() == [4] * CLASSES


def test_neighbouring_classes_share_a_pattern() -> None:
    """The overlap the benchmark relies on: class c shares a stripe pattern with c + 1 (a ring)."""
    for c in range(CLASSES):
        a, b, _, _ = class_recipe(c)
        a2, b2, _, _ = class_recipe((c + 1) % CLASSES)
        assert {a, b} & {a2, b2}


def test_image_dataset_is_a_split_image_dataset() -> None:
    ds = image_dataset(200, seed=0)
    assert ds.is_image and ds.input_shape == (3, 32, 32) and ds.num_classes == CLASSES
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (140, 20, 40)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


def test_bench_quality_runs_every_method_size_and_dataset() -> None:
    name = "bench_quality-test"
    bench_quality.main(["--seeds", "1", "--epochs", "0.01", "--images", "100", "--name", name])
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text())
    path.unlink()
    cases = result["cases"]
    assert [(c["dataset"], c["student"]) for c in cases] == [
        (d, label) for d, spec in bench_quality.SETS.items() for label, _ in spec["students"]
    ]
    for case in cases:
        assert list(case["arms"]) == [arm for arm, _ in bench_quality.ARMS]
        for runs in case["arms"].values():
            [run] = runs
            assert 0.0 <= run["test_acc"] <= 1.0 and 0.0 <= run["test_agreement"] <= 1.0
            assert run["test_kl_to_teacher"] >= 0.0
        assert case["verdict"].startswith("best method ")
    digits = cases[0]
    assert digits["train_samples"] == 188  # 15% of the 1,258 training images of digits
