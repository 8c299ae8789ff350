"""/api/searches/: owner-only (404 for others), budgets and spaces validated with clear 400s, cancel."""

from __future__ import annotations

import pytest

from kd_core.config import parse_config
from kd_core.search import Budget
from webapp.studio import search_study, services
from webapp.studio.models import Artifact, Checkpoint, Experiment
from webapp.studio.search import trial_config
from webapp.studio.search_models import Search, SearchTrial
from workers import search as worker_search

pytestmark = pytest.mark.django_db


def digits_teacher(owner) -> Checkpoint:
    return Checkpoint.objects.create(
        owner=owner, name="cnn teacher", format="safetensors", file="t.safetensors", num_params=20_000,
        num_classes=10, input_shape=[1, 8, 8], status=Checkpoint.READY, arch={"arch": "cnn", "channels": [16, 32]},
    )  # fmt: skip


def body(teacher_row: Checkpoint, **extra) -> dict:
    return {"name": "fit 5k", "dataset": "digits", "teacher": teacher_row.pk, "budget": {"max_params": 5000},
            "space": {"students": "auto", "temperature": [1, 8], "alpha": [0.3, 0.95]}, "trials": 4,
            "parallel": 2, "epochs": 3, **extra}  # fmt: skip


def post(client, data, capture):
    with capture(execute=False):
        return client.post("/api/searches/", data, content_type="application/json")


def test_create_list_and_detail(owner, owner_client, django_capture_on_commit_callbacks):
    teacher = digits_teacher(owner)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = owner_client.post("/api/searches/", body(teacher), content_type="application/json")
    assert response.status_code == 201, response.content
    answer = response.json()
    assert answer["status"] == "queued"
    assert len(callbacks) == 1  # the first advance is enqueued on commit (a worker asks Optuna, not the web)
    search = Search.objects.get(pk=answer["id"])
    assert search.owner == owner and search.trials == 4 and search.parallel == 2
    # "auto" derived students whose parameters fit the budget
    assert search.space["auto"] and search.space["students"]
    detail = owner_client.get(f"/api/searches/{search.pk}/").json()
    assert detail["status"] == "queued" and detail["trials"] == [] and detail["pareto"] == []
    assert detail["best"] is None and detail["cost"] == "params"
    listed = owner_client.get("/api/searches/").json()["searches"]
    assert [s["id"] for s in listed] == [search.pk]


def test_other_users_get_404(owner, other_client, owner_client, django_capture_on_commit_callbacks):
    teacher = digits_teacher(owner)
    search_id = post(owner_client, body(teacher), django_capture_on_commit_callbacks).json()["id"]
    assert other_client.get(f"/api/searches/{search_id}/").status_code == 404
    assert other_client.post(f"/api/searches/{search_id}/cancel/").status_code == 404
    assert other_client.get("/api/searches/").json()["searches"] == []
    # another user's teacher is not found either
    response = post(other_client, body(teacher), django_capture_on_commit_callbacks)
    assert response.status_code == 400 and "not found" in response.json()["error"]


def test_anonymous_is_refused(anon_client):
    assert anon_client.get("/api/searches/").status_code == 401


@pytest.mark.parametrize(
    ("budget", "words"),
    [
        ({}, "at least one of max_params"),
        ({"max_params": -3}, "'budget.max_params' must be a positive integer"),
        ({"max_params": 2.5}, "'budget.max_params' must be a positive integer"),
        ({"max_latency_ms": "fast"}, "'budget.max_latency_ms' must be a positive number"),
        ({"max_params": 5000, "device": "tpu"}, "'budget.device' must be one of cpu, cuda"),
        ({"max_params": 5000, "flops": 3}, "unknown budget field(s): flops"),
        ({"max_params": 10}, "no student of the zoo fits this budget"),
        ("small", "'budget' must be an object"),
    ],
)
def test_bad_budgets_are_400_in_words(owner, owner_client, django_capture_on_commit_callbacks, budget, words):
    teacher = digits_teacher(owner)
    response = post(owner_client, body(teacher, budget=budget), django_capture_on_commit_callbacks)
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    assert not Search.objects.exists()


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"students": "some"}, "'space.students' must be \"auto\" or a list"),
        ({"students": []}, "'space.students' must be \"auto\" or a list"),
        ({"students": [{"arch": "transformer"}]}, "space.students[0].arch"),
        ({"students": [{"arch": "resnet", "depth": 9}]}, "6n+2"),
        ({"temperature": [5, 1]}, "'space.temperature' must be [low, high]"),
        ({"alpha": [0, 2]}, "'space.alpha' must be [low, high]"),
        ({"method": ["fitnet"]}, "'space.method' must list methods among hinton, dkd, dist"),
        ({"method": []}, "'space.method' must list methods among"),
        ({"method": "hinton dkd"}, "'space.method' must list methods among"),
        (
            {"logit_standardization": "yes"},
            "'space.logit_standardization' must be true, false or [false, true]",
        ),
        ({"logit_standardization": []}, "'space.logit_standardization' must be true, false or [false, true]"),
        ({"method": ["dist"], "logit_standardization": True}, "applies to methods hinton and dkd, not dist"),
        ({"width": 3}, "unknown space field(s): width"),
    ],
)
def test_bad_spaces_are_400_in_words(owner, owner_client, django_capture_on_commit_callbacks, space, words):
    teacher = digits_teacher(owner)
    response = post(owner_client, body(teacher, space=space), django_capture_on_commit_callbacks)
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"trials": 0}, "'trials' must be an integer from 1"),
        ({"parallel": 1000}, "'parallel' must be an integer from 1"),
        ({"epochs": "many"}, "'epochs' must be an integer"),
        ({"objective": "test_acc"}, "'objective' must be \"val_acc\""),
        ({"config": {"model": {}}}, "'config' may set only"),
        ({"config": {"lr": -1}}, "'config': 'lr' must be >="),
        (
            {"space": {"method": ["hinton", "dist"]}, "config": {"batch_size": 1}},
            "'config' with method dist: 'batch_size' must be at least 2 for method dist",
        ),
        ({"colour": "red"}, "unknown search field(s): colour"),
        ({"teacher": None}, "'teacher' is required"),
    ],
)
def test_bad_requests_are_400(owner, owner_client, django_capture_on_commit_callbacks, extra, words):
    teacher = digits_teacher(owner)
    response = post(owner_client, body(teacher, **extra), django_capture_on_commit_callbacks)
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]


def test_a_user_list_keeps_students_over_the_budget(owner, owner_client, django_capture_on_commit_callbacks):
    # They are recorded over_budget by the worker, with the figure, instead of being refused here.
    teacher = digits_teacher(owner)
    students = [{"arch": "mlp", "hidden": [16]}, {"arch": "mlp", "hidden": [512]}]
    response = post(
        owner_client, body(teacher, space={"students": students}), django_capture_on_commit_callbacks
    )
    assert response.status_code == 201, response.content
    assert Search.objects.get().space["students"] == students


def test_cancel_stops_the_search_and_its_trials(owner, owner_client, django_capture_on_commit_callbacks):
    teacher = digits_teacher(owner)
    search = Search.objects.get(
        pk=post(owner_client, body(teacher), django_capture_on_commit_callbacks).json()["id"]
    )
    dataset = search.dataset
    queued = Experiment.objects.create(
        owner=owner, name="t0", kind="distill", dataset=dataset, teacher=teacher
    )
    running = Experiment.objects.create(
        owner=owner, name="t1", kind="distill", dataset=dataset, teacher=teacher, status=Experiment.RUNNING
    )
    SearchTrial.objects.create(search=search, number=0, experiment=queued)
    SearchTrial.objects.create(search=search, number=1, experiment=running, state=SearchTrial.RUNNING)
    with django_capture_on_commit_callbacks(execute=False):
        response = owner_client.post(f"/api/searches/{search.pk}/cancel/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    queued.refresh_from_db()
    running.refresh_from_db()
    assert queued.status == "cancelled"
    assert running.status == "running" and running.cancel_requested  # its worker stops it
    with django_capture_on_commit_callbacks(execute=False):
        again = owner_client.post(f"/api/searches/{search.pk}/cancel/")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


# --- method in the space (issue 12 follow-up) -------------------------------------------------------------------


def test_methods_and_standardisation_are_stored_in_the_space(
    owner, owner_client, django_capture_on_commit_callbacks
):
    teacher = digits_teacher(owner)
    space = {"students": "auto", "method": ["dkd", "hinton", "dkd"], "logit_standardization": [True, False]}
    response = post(owner_client, body(teacher, space=space), django_capture_on_commit_callbacks)
    assert response.status_code == 201, response.content
    stored = Search.objects.get().space
    assert stored["method"] == ["dkd", "hinton"] and stored["logit_standardization"] == [False, True]
    # the defaults: Hinton only, no standardisation
    response = post(owner_client, body(teacher), django_capture_on_commit_callbacks)
    stored = Search.objects.get(pk=response.json()["id"]).space
    assert stored["method"] == ["hinton"] and stored["logit_standardization"] == [False]
    # a single name is accepted as a list of one
    response = post(owner_client, body(teacher, space={"method": "dist"}), django_capture_on_commit_callbacks)
    assert Search.objects.get(pk=response.json()["id"]).space["method"] == ["dist"]


@pytest.mark.parametrize("method", ["hinton", "dkd", "dist"])
def test_each_method_makes_a_trial_config_that_parses(method):
    config = parse_config(trial_config(
        {"batch_size": 32}, 1, 2, 6, {"arch": "mlp", "hidden": [16]}, 3.0, 0.7, "t", method=method,
        logit_standardization=method != "dist",
    )).to_dict()  # fmt: skip
    assert config["method"] == method and config["logit_standardization"] == (method != "dist")
    if method == "dkd":  # DKD's warm-up is the paper's share (20/240) of the trial's epochs, not 20 epochs
        assert config["method_options"]["warmup_epochs"] == pytest.approx(0.5)


@pytest.mark.django_db(transaction=True)  # Optuna writes through its own connection to the test database
def test_trials_sample_the_methods_and_carry_them_into_their_experiments(owner):
    teacher = digits_teacher(owner)
    dataset = services._own_dataset(owner, "digits")
    search = Search.objects.create(
        owner=owner, name="methods", dataset=dataset, teacher=teacher, budget={"max_params": 5000},
        space={"students": [{"arch": "mlp", "hidden": [16]}], "temperature": [2.0, 4.0], "alpha": [0.5, 0.9],
               "method": ["hinton", "dkd", "dist"], "logit_standardization": [False, True], "auto": False},
        trials=12, parallel=12, epochs=3, seed=3,
    )  # fmt: skip
    seen = set()
    for asked in range(12):
        _, _, params = search_study.ask(search, asked)
        assert params["method"] in ("hinton", "dkd", "dist")
        if params["method"] == "dist":
            assert params["logit_standardization"] is False  # DIST never standardises
        seen.add((params["method"], params["logit_standardization"]))
    assert {m for m, _ in seen} == {"hinton", "dkd", "dist"}
    assert {ls for _, ls in seen} == {False, True}
    # a trial queued by the worker carries its method into its experiment's config
    trial = worker_search._new_trial(search, Budget(max_params=5000), 12)
    exp = trial.experiment
    assert exp is not None and trial.state == SearchTrial.QUEUED
    assert exp.config["method"] == trial.params["method"]
    assert exp.config["logit_standardization"] == trial.params["logit_standardization"]


# --- best val acc on the list, and which trials have a model to use ------------------------------------------


def _finished_trial(search, number, acc, params_count, exported, state=SearchTrial.COMPLETE):
    exp = Experiment.objects.create(
        owner=search.owner, name=f"t{number}", kind="distill", dataset=search.dataset, teacher=search.teacher,
        status=Experiment.SUCCEEDED,
    )  # fmt: skip
    if exported:
        Artifact.objects.create(experiment=exp, kind="safetensors", file=f"a/{number}.safetensors", size=1)
    return SearchTrial.objects.create(
        search=search, number=number, experiment=exp, state=state,
        params={"student": {"arch": "mlp", "hidden": [16]}, "temperature": 2.0, "alpha": 0.5, "method": "hinton"},
        figures={"params": params_count}, metrics={"val_acc": acc, "test_acc": acc - 0.01},
    )  # fmt: skip


def test_list_entries_carry_the_best_val_acc_and_detail_says_which_trials_exported(
    owner, owner_client, django_capture_on_commit_callbacks
):
    teacher = digits_teacher(owner)
    search = Search.objects.get(
        pk=post(owner_client, body(teacher), django_capture_on_commit_callbacks).json()["id"]
    )
    listed = owner_client.get("/api/searches/").json()["searches"][0]
    assert listed["best_val_acc"] is None and listed["best_test_acc"] is None  # no trial yet
    front = _finished_trial(search, 0, 0.91, 3000, exported=True)
    _finished_trial(search, 1, 0.80, 4000, exported=False)  # dominated: finished off the front
    _finished_trial(search, 2, 0.95, 4500, exported=False, state=SearchTrial.PRUNED)
    listed = owner_client.get("/api/searches/").json()["searches"][0]
    assert listed["best"] == front.experiment_id
    assert listed["best_val_acc"] == pytest.approx(0.91) and listed["best_test_acc"] == pytest.approx(0.90)
    detail = owner_client.get(f"/api/searches/{search.pk}/").json()
    assert {t["number"]: t["exported"] for t in detail["trials"]} == {0: True, 1: False, 2: False}
    assert detail["best_val_acc"] == pytest.approx(0.91)
