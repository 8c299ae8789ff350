"""A seeded CIFAR-shaped image set (32x32x3 uint8, 10 classes) whose classes overlap, for distillation benchmarks.

Every class mixes two of five stripe patterns and has a hue on a colour wheel; class c and its neighbours
c - 1 and c + 1 share a pattern and have close hues (a ring of similar classes). Each image draws its own
mixture weight, hue, stripe phases and brightness around its class's values, plus pixel noise, so
neighbouring classes overlap: a teacher's probabilities say which other class an image resembles (the
"dark knowledge" a distilled student can use), which a hard label does not. bench/bench_scale.py's
`class_image` is the opposite case (one separable pattern per class), made to feed an ingest benchmark.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSES = 10
PATTERNS = 5
SIDE = 32
# Per-image spread around the class's values: larger = more overlap between neighbouring classes.
MIX_SPREAD = 0.16
HUE_SPREAD = 0.05
PIXEL_NOISE = 0.12


def _pattern(k: int, phase: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Stripe pattern k: its own orientation and frequency, shifted by `phase`; values in [0, 1]."""
    angle = k * np.pi / PATTERNS
    freq = 2.0 + 0.75 * k
    return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)


def _hue_rgb(hue: float, saturation: float = 0.55) -> np.ndarray:
    """An RGB colour (3,) in [0, 1] for a hue in [0, 1) (cosine colour wheel), mixed toward grey."""
    wheel = 0.5 + 0.5 * np.cos(2 * np.pi * (hue - np.array([0.0, 1 / 3, 2 / 3])))
    return (1 - saturation) * 0.6 + saturation * wheel


def class_recipe(label: int) -> tuple[int, int, float, float]:
    """(pattern a, pattern b, weight of b, hue) of a class: classes 2k and 2k+1 mix patterns k and k+1."""
    a = (label // 2) % PATTERNS
    b = (a + 1) % PATTERNS
    weight_b = 0.3 if label % 2 == 0 else 0.7
    return a, b, weight_b, label / CLASSES


def make_images(n: int, seed: int = 0, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, side, side, 3) uint8 and their labels (n,) int64, balanced over the classes; deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    labels = rng.permutation(np.arange(n) % CLASSES).astype(np.int64)
    images = np.empty((n, side, side, 3), np.uint8)
    for i, label in enumerate(labels):
        a, b, weight_b, hue = class_recipe(int(label))
        w = float(np.clip(weight_b + rng.normal(0, MIX_SPREAD), 0, 1))
        phases = rng.uniform(0, 2 * np.pi, 2)
        gray = (1 - w) * _pattern(a, phases[0], xx, yy) + w * _pattern(b, phases[1], xx, yy)
        colour = _hue_rgb((hue + rng.normal(0, HUE_SPREAD)) % 1.0)
        brightness = rng.uniform(0.7, 1.1)
        img = brightness * (0.25 + 0.75 * gray[..., None]) * colour + rng.normal(
            0, PIXEL_NOISE, (side, side, 3)
        )
        images[i] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return images, labels


def image_dataset(n: int = 3000, seed: int = 0, split_seed: int = 0) -> Any:
    """make_images as a kd_core Dataset (channels first, model input = pixels / 255; 70/10/20 split)."""
    from kd_core.data.dataset import RawData, build_dataset

    images, labels = make_images(n, seed)
    raw = RawData(
        name="synthetic-images",
        format="builtin",
        x=images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255),
        y=labels,
        class_names=[f"c{k}" for k in range(CLASSES)],
        is_image=True,
        fingerprint_options={"generator": "bench.synthetic_images", "n": n, "seed": seed},
        info={"source": f"bench/synthetic_images.py, {n} images, seed {seed}"},
    )
    return build_dataset(raw, seed=split_seed, val_fraction=0.1, test_fraction=0.2)
