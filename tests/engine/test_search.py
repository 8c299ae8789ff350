"""kd_core.search: budgets, the student space ("auto" from the zoo), budget checks, latency, the Pareto front."""

from __future__ import annotations

import itertools
import random

import pytest

from kd_core.errors import ConfigError
from kd_core.search import (
    Budget,
    derive_students,
    dominates,
    latency_excess,
    latency_key,
    measure_latency,
    pareto_front,
    parse_budget,
    parse_space,
    static_excess,
    student_figures,
    trial_choice,
)

DIGITS = (1, 8, 8)


def test_budget_parsing_and_cost():
    assert parse_budget({"max_params": 5000}).cost == "params"
    assert parse_budget({"max_size_bytes": 20_000}).cost == "size_bytes"
    assert parse_budget({"max_params": 9, "max_latency_ms": 0.5}).cost == "latency_ms"
    assert parse_budget({"max_latency_ms": 1}).device == "cpu"
    for bad in ({}, {"max_params": 0}, {"max_params": True}, {"max_latency_ms": float("nan")}, [1]):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_auto_students_fit_the_budget_and_cover_the_families():
    budget = Budget(max_params=5000)
    students = derive_students(DIGITS, 10, budget)
    assert 1 < len(students) <= 32
    sizes = [student_figures(s, DIGITS, 10)["params"] for s in students]
    assert all(p <= 5000 for p in sizes)
    assert sizes == sorted(sizes)  # smallest first
    assert {s["arch"] for s in students} >= {"mlp", "cnn"}
    # vectors get MLPs only
    assert {s["arch"] for s in derive_students((20,), 3, Budget(max_params=10_000))} == {"mlp"}
    # a larger budget admits resnets
    assert any(s["arch"] == "resnet" for s in derive_students((3, 32, 32), 10, Budget(max_params=200_000)))


def test_size_budget_counts_bytes():
    students = derive_students(DIGITS, 10, Budget(max_size_bytes=8_000))
    assert all(student_figures(s, DIGITS, 10)["size_bytes"] <= 8_000 for s in students)


def test_no_student_fits_says_so():
    with pytest.raises(ConfigError, match="no student of the zoo fits"):
        derive_students(DIGITS, 10, Budget(max_params=20))


def test_space_validation_and_user_lists():
    budget = Budget(max_params=5000)
    space = parse_space(
        {"students": [{"arch": "mlp", "hidden": [16]}], "temperature": [2, 4]}, DIGITS, 10, budget
    )
    assert space.students == [{"arch": "mlp", "hidden": [16]}] and space.temperature == (2.0, 4.0)
    assert space.methods == ["hinton"] and not space.auto
    assert parse_space(None, DIGITS, 10, budget).auto
    with pytest.raises(ConfigError, match="needs image input"):
        parse_space({"students": [{"arch": "cnn", "channels": [4]}]}, (20,), 3, budget)
    with pytest.raises(ConfigError, match="alpha"):
        parse_space({"alpha": [0.5, 0.2]}, DIGITS, 10, budget)


def test_space_methods_and_logit_standardisation():
    budget = Budget(max_params=5000)
    space = parse_space({"method": ["dkd", "hinton", "dkd", "dist"]}, DIGITS, 10, budget)
    assert space.methods == ["dkd", "hinton", "dist"] and space.standardize == [False]
    assert parse_space({"method": "dist"}, DIGITS, 10, budget).methods == ["dist"]
    assert parse_space({"logit_standardization": True}, DIGITS, 10, budget).standardize == [True]
    both = parse_space(
        {"method": ["hinton", "dist"], "logit_standardization": [True, False]}, DIGITS, 10, budget
    )
    assert both.standardize == [False, True]
    assert both.to_dict()["method"] == ["hinton", "dist"]
    assert both.to_dict()["logit_standardization"] == [False, True]
    for bad, words in (
        ({"method": ["fitnet"]}, "must list methods among hinton, dkd, dist"),
        ({"method": []}, "must list methods"),
        ({"method": [3]}, "must list methods"),
        ({"logit_standardization": "on"}, "must be true, false or \\[false, true\\]"),
        ({"logit_standardization": [1]}, "must be true, false"),
        ({"method": ["dist"], "logit_standardization": True}, "not dist"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_space(bad, DIGITS, 10, budget)
    # a dist trial never standardises, whatever was drawn; hinton and dkd take the draw
    assert trial_choice("dist", True) is False
    assert trial_choice("dkd", True) is True and trial_choice("hinton", False) is False


def test_budget_checks_name_the_figure():
    figures = student_figures({"arch": "mlp", "hidden": [512]}, DIGITS, 10)
    assert "parameters >" in static_excess(figures, Budget(max_params=5000))
    assert static_excess(figures, Budget(max_params=10**6)) is None
    assert "bytes >" in static_excess(figures, Budget(max_size_bytes=1000))
    assert "ms per sample on cpu" in latency_excess(2.5, Budget(max_latency_ms=1.0))
    assert latency_excess(0.5, Budget(max_latency_ms=1.0)) is None


def test_latency_is_measured_and_keyed_by_architecture_and_shape():
    small = measure_latency({"arch": "mlp", "hidden": [8]}, DIGITS, 10, repeats=5)
    assert 0 < small < 1000
    a = latency_key({"arch": "mlp", "hidden": [8]}, DIGITS, 10, "cpu")
    assert a == latency_key({"arch": "mlp", "hidden": [8], "dropout": 0.0}, DIGITS, 10, "cpu")  # same model
    assert a != latency_key({"arch": "mlp", "hidden": [8]}, (1, 16, 16), 10, "cpu")
    assert a != latency_key({"arch": "mlp", "hidden": [8]}, DIGITS, 10, "cuda")


def test_pareto_front_is_not_dominated_and_best_first():
    rng = random.Random(0)
    for _ in range(50):
        points = [(i, rng.choice([0.5, 0.7, 0.9, rng.random()]), rng.choice([1, 2, 3, rng.random() * 4]))
                  for i in range(rng.randint(1, 12))]  # fmt: skip
        front = pareto_front(points)
        chosen = {k: (a, c) for k, a, c in points if k in front}
        assert front, points
        for key in front:  # no point of the input dominates a front point
            assert not any(dominates((a, c), chosen[key]) for _, a, c in points)
        for k, a, c in points:  # every point off the front is dominated or duplicates one on it
            if k not in front:
                assert any(dominates(p, (a, c)) or p == (a, c) for p in chosen.values())
        accs = [chosen[k][0] for k in front]
        assert accs == sorted(accs, reverse=True)
    assert pareto_front([("a", 0.9, 5), ("b", 0.8, 1), ("c", 0.8, 2), ("d", 0.9, 5)]) == ["a", "b"]
    assert not any(dominates(x, y) for x, y in itertools.permutations([(0.9, 5), (0.8, 1)], 2))
