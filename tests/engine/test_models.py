"""Model zoo: shapes, sizes, normalisation inside the model, determinism, refusals, stats."""

import math

import pytest
import torch
from torch import nn

from kd_core.errors import ConfigError
from kd_core.models import MAX_PARAMS, BasicBlock, KDModel, build_model, count_params, full_spec, model_stats


def test_mlp_flattens_any_input_and_has_the_expected_size():
    torch.manual_seed(0)
    vec = build_model({"arch": "mlp", "hidden": [32, 16]}, (64,), 10)
    img = build_model({"arch": "mlp", "hidden": [32, 16]}, (1, 8, 8), 10)
    assert vec(torch.rand(5, 64)).shape == (5, 10)
    assert img(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    expected = (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert count_params(vec) == count_params(img) == expected
    assert isinstance(vec, KDModel) and vec.input_shape == (64,) and vec.num_classes == 10


def test_mlp_without_hidden_layers_is_a_linear_classifier():
    model = build_model({"arch": "mlp", "hidden": []}, (4,), 3)
    assert count_params(model) == 4 * 3 + 3


def test_cnn_pools_while_spatial_is_large_and_uses_bn_without_conv_bias():
    model = build_model({"arch": "cnn", "channels": [4, 8, 8], "hidden": [16], "dropout": 0.2}, (1, 8, 8), 10)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2  # 8 -> 4 -> 2, then no more pooling
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 3
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_resnet_follows_the_documented_cifar_layout():
    model = build_model({"arch": "resnet", "depth": 14, "width": 2}, (3, 16, 16), 7)
    blocks = [m for m in model.features if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * 2  # depth 14 -> n = 2 blocks per stage
    assert [b.conv2.out_channels for b in blocks] == [32, 32, 64, 64, 128, 128]
    assert model.features[0].out_channels == 32  # stem = 16 * width
    assert model.classifier.in_features == 128
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 7)
    # Tiny images still work: stride-2 stages bottom out at 1x1.
    small = build_model({"arch": "resnet"}, (1, 2, 2), 3)
    assert small(torch.rand(2, 1, 2, 2)).shape == (2, 3)


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_image_archs_refuse_vector_input_with_a_clear_message(arch):
    with pytest.raises(ConfigError, match=r"needs image input \(C, H, W\).*\(64,\)"):
        build_model({"arch": arch}, (64,), 10)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"arch": "vit"}, "must be one of"),
        ({"arch": "mlp", "channels": [3]}, "unknown field"),
        ({"arch": "resnet", "depth": 9}, "6n\\+2"),
        ({"arch": "cnn", "channels": []}, "at least one"),
        ("mlp", "must be an object"),
    ],
)
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec, (1, 8, 8), 10)


@pytest.mark.parametrize(
    "shape, classes", [((), 10), ((0, 8), 10), ((64,), 0), ((64,), True), ((1, 2, 3, 4, 5), 2), ("abc", 2)]
)
def test_bad_shapes_and_class_counts_are_refused(shape, classes):
    with pytest.raises(ConfigError):
        build_model({"arch": "mlp"}, shape, classes)


def test_huge_specs_are_refused_before_allocating():
    with pytest.raises(ConfigError, match="parameters; the limit"):
        build_model({"arch": "mlp", "hidden": [16_384] * 32}, (3, 64, 64), 10)
    assert MAX_PARAMS >= 10_000_000


def test_full_spec_fills_defaults():
    assert full_spec({"arch": "mlp"}) == {"arch": "mlp", "hidden": [64], "dropout": 0.0}
    assert full_spec({"arch": "resnet", "width": 4}) == {"arch": "resnet", "depth": 8, "width": 4}
    model = build_model({"arch": "cnn", "channels": [4]}, (1, 4, 4), 2)
    assert model.spec == {"arch": "cnn", "channels": [4], "hidden": [], "dropout": 0.0}


def test_normalisation_is_applied_first_inside_the_model():
    torch.manual_seed(0)
    pre = {"mean": [0.5, 1.0, -1.0], "std": [2.0, 0.5, 1.0]}
    normed = build_model({"arch": "cnn", "channels": [4]}, (3, 4, 4), 5, pre).eval()
    plain = build_model({"arch": "cnn", "channels": [4]}, (3, 4, 4), 5).eval()
    state = {k: v for k, v in normed.state_dict().items() if k not in ("mean", "std")}
    plain.load_state_dict(state, strict=False)
    x = torch.rand(6, 3, 4, 4)
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), plain((x - mean) / std))
    assert normed.preprocessing == {"mean": [0.5, 1.0, -1.0], "std": [2.0, 0.5, 1.0]}
    # Per feature for vector input; a single value broadcasts.
    vec = build_model({"arch": "mlp"}, (3,), 2, {"mean": [1.0], "std": [2.0]})
    assert vec.mean.shape == (1, 3) and vec.std.flatten().tolist() == [2.0, 2.0, 2.0]
    assert build_model({"arch": "mlp"}, (3,), 2).preprocessing == {"mean": [0.0] * 3, "std": [1.0] * 3}


@pytest.mark.parametrize(
    "pre",
    [{"mean": [0.0, 0.0]}, {"std": [0.0]}, {"std": [float("nan")]}, {"mean": ["a"]}, {"scale": [1.0]}, [1.0]],
)
def test_bad_preprocessing_is_refused(pre):
    with pytest.raises(ConfigError):
        build_model({"arch": "mlp"}, (3, 4, 4), 2, pre)


def test_init_is_deterministic_given_the_seed():
    def state(seed):
        torch.manual_seed(seed)
        return build_model({"arch": "resnet"}, (1, 8, 8), 4).state_dict()

    a, b, c = state(1), state(1), state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_dropout_is_off_in_eval_mode():
    model = build_model({"arch": "mlp", "hidden": [64], "dropout": 0.5}, (8,), 3).eval()
    x = torch.rand(4, 8)
    torch.testing.assert_close(model(x), model(x))


def test_models_script_and_trace():
    x = torch.rand(3, 1, 8, 8)
    for spec in ({"arch": "mlp"}, {"arch": "cnn", "channels": [4], "hidden": [8]}, {"arch": "resnet"}):
        model = build_model(spec, (1, 8, 8), 4).eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x))
            traced = torch.jit.trace(model, x[:1])
            torch.testing.assert_close(traced(x), model(x))


def test_model_stats_reports_size_and_latency_without_touching_the_model():
    model = build_model({"arch": "cnn", "channels": [4, 8]}, (1, 8, 8), 10).train()
    stats = model_stats(model, repeats=3)
    assert stats["params"] == count_params(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert stats["size_bytes"] == 4 * stats["params"] + buffers
    assert stats["cpu_latency_ms"] > 0 and math.isfinite(stats["cpu_latency_ms"])
    assert model.training  # measured on a copy
    scripted = torch.jit.script(build_model({"arch": "mlp"}, (5,), 2))
    assert model_stats(scripted, (5,), repeats=2)["params"] == 5 * 64 + 64 + 64 * 2 + 2


def test_model_stats_latency_is_a_time_bounded_median_with_its_spread():
    import time

    # A tiny model: thousands of single-sample calls fit the budget, and batching shows its time is overhead.
    tiny = build_model({"arch": "mlp", "hidden": [8]}, (16,), 3)
    started = time.perf_counter()
    stats = model_stats(tiny, budget_s=0.3)
    assert time.perf_counter() - started < 0.3 + 0.5  # the budget, plus copying the model
    assert 0 < stats["cpu_latency_p10_ms"] <= stats["cpu_latency_ms"] <= stats["cpu_latency_p90_ms"]
    assert stats["latency_repeats"] >= 20 and stats["latency_batch_size"] == 1
    # On one thread (reproducible on a busy worker), and the process's setting is left as it was.
    before = torch.get_num_threads()
    assert stats["latency_threads"] == 1 and torch.get_num_threads() == before
    assert model_stats(tiny, budget_s=0.05, threads=None)["latency_threads"] == before
    assert 0 <= stats["latency_overhead"] <= 1
    # A slow model: the budget bounds the measurement; at least 3 timed calls, no batched figure past the budget.
    slow = build_model({"arch": "mlp", "hidden": [2048, 2048, 2048]}, (2048,), 10)
    started = time.perf_counter()
    stats = model_stats(slow, budget_s=0.05)
    single = stats["cpu_latency_ms"] / 1000.0
    assert time.perf_counter() - started < 0.05 + 12 * single + 1.0
    assert stats["latency_repeats"] >= 3
    assert stats["cpu_latency_p10_ms"] <= stats["cpu_latency_ms"] <= stats["cpu_latency_p90_ms"]
    # The repetition cap still holds inside the budget.
    assert model_stats(tiny, repeats=7, budget_s=5.0)["latency_repeats"] == 7


def test_cpu_latency_quantiles_of_known_times():
    from kd_core.models.wrap import cpu_latency, quantile

    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    assert quantile([7.0], 0.9) == 7.0

    # A callable that cannot take a batch still gets its single-sample figures, without an overhead figure.
    def one_only(x):
        assert x.shape[0] == 1
        return x.sum()

    lat = cpu_latency(one_only, torch.zeros(1, 4), budget_s=0.05)
    assert lat["overhead"] is None and lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]


def test_numpy_shapes_counts_and_statistics_are_accepted():
    import numpy as np

    shape = tuple(np.array([3, 4, 4]))
    model = build_model(
        {"arch": "cnn", "channels": [2]}, shape, np.int64(5), {"mean": np.zeros(3), "std": (1, 2, 3)}
    )
    assert model.input_shape == (3, 4, 4) and type(model.input_shape[0]) is int
    assert model.num_classes == 5 and type(model.num_classes) is int
    assert model.preprocessing["std"] == [1.0, 2.0, 3.0]
