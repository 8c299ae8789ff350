"""Experiment state transitions on a real database: claims, leases, attempts, finishing once, time budget."""

from __future__ import annotations

import datetime

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from webapp.studio.models import Experiment
from workers.records import time_budget_s

pytestmark = pytest.mark.django_db


def _listen(experiment_id: int) -> tuple:
    """Join the experiment's group (messages are sent on commit: tests run them with the capture fixture)."""
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"experiment-{experiment_id}", channel)
    return layer, channel


def test_claim_takes_a_queued_job_once_and_sends_its_status(
    owner, make_experiment, django_capture_on_commit_callbacks
) -> None:
    exp = make_experiment(owner)
    layer, channel = _listen(exp.pk)
    with django_capture_on_commit_callbacks(execute=True):
        assert exp.claim(token="a" * 32, lease_s=60, max_attempts=3, worker="w1") == "claimed"
    assert (exp.status, exp.attempts, exp.worker, exp.lease_token) == ("running", 1, "w1", "a" * 32)
    assert exp.started is not None and exp.lease_until > timezone.now()
    message = async_to_sync(layer.receive)(channel)["message"]
    assert message == {"type": "status", "status": "running", "progress": 0.0, "eta_s": None, "attempts": 1}
    # A second delivery, while the first one's lease is live: busy, and the row is untouched.
    other = Experiment.objects.get(pk=exp.pk)
    assert other.claim(token="b" * 32, lease_s=60, max_attempts=3) == "busy"
    other.refresh_from_db()
    assert (other.attempts, other.lease_token) == (1, "a" * 32)


def test_an_expired_lease_is_taken_over_and_the_old_holder_can_neither_renew_nor_finish(
    owner, make_experiment
) -> None:
    exp = make_experiment(owner)
    assert exp.claim(token="old", lease_s=60, max_attempts=3) == "claimed"
    Experiment.objects.filter(pk=exp.pk).update(lease_until=timezone.now() - datetime.timedelta(seconds=1))
    taker = Experiment.objects.get(pk=exp.pk)
    assert taker.claim(token="new", lease_s=60, max_attempts=3) == "claimed"
    assert taker.attempts == 2
    assert not exp.renew_lease("old", 60)  # the old holder learns it lost the job
    assert not exp.finish(Experiment.SUCCEEDED, token="old")
    assert taker.renew_lease("new", 60)
    assert taker.finish(Experiment.SUCCEEDED, token="new", metrics={"val_acc": 1.0})
    assert (taker.status, taker.lease_token, taker.lease_until) == ("succeeded", "", None)


def test_a_finished_job_is_never_reopened(owner, make_experiment) -> None:
    exp = make_experiment(owner)
    assert exp.claim(token="t", lease_s=60, max_attempts=3) == "claimed"
    assert exp.finish(Experiment.FAILED, token="t", error="boom")
    assert not exp.finish(Experiment.SUCCEEDED)
    assert not exp.requeue()
    assert exp.claim(token="u", lease_s=60, max_attempts=3) == "gone"
    exp.refresh_from_db()
    assert (exp.status, exp.error, exp.attempts) == ("failed", "boom", 1)


def test_a_cancel_landing_before_the_claim_wins(owner, make_experiment) -> None:
    exp = make_experiment(owner)
    stale = Experiment.objects.get(pk=exp.pk)  # what a worker read before the cancel
    assert exp.cancel() and exp.status == "cancelled"
    assert stale.claim(token="t", lease_s=60, max_attempts=3) == "gone"
    assert stale.status == "cancelled" and stale.attempts == 0


def test_a_cancel_requested_on_a_dead_holders_job_settles_it(owner, make_experiment) -> None:
    exp = make_experiment(owner)
    assert exp.claim(token="t", lease_s=60, max_attempts=3) == "claimed"
    assert exp.cancel() and exp.status == "running" and exp.cancel_requested
    Experiment.objects.filter(pk=exp.pk).update(lease_until=timezone.now() - datetime.timedelta(seconds=1))
    assert exp.claim(token="u", lease_s=60, max_attempts=3) == "gone"
    assert exp.status == "cancelled"


def test_the_delivery_after_max_attempts_deaths_fails_the_job_saying_so(
    owner, make_experiment, django_capture_on_commit_callbacks
) -> None:
    exp = make_experiment(owner)
    for n in range(3):
        assert exp.claim(token=f"t{n}", lease_s=60, max_attempts=3) == "claimed"
        # The worker dies: its lease lapses (or a restarted worker of its name requeues the job).
        if n % 2:
            assert exp.requeue(worker=exp.worker)
        else:
            Experiment.objects.filter(pk=exp.pk).update(
                lease_until=timezone.now() - datetime.timedelta(seconds=1)
            )
    layer, channel = _listen(exp.pk)
    with django_capture_on_commit_callbacks(execute=True):
        assert exp.claim(token="t3", lease_s=60, max_attempts=3) == "exhausted"
    assert (exp.status, exp.attempts) == ("failed", 3)
    assert exp.error == "the worker died 3 times running this job"
    assert async_to_sync(layer.receive)(channel)["message"]["error"] == exp.error


def test_progress_reports_only_while_running_under_the_lease(owner, make_experiment) -> None:
    exp = make_experiment(owner)
    assert not Experiment.report_progress(exp.pk, 0.5, 3.0)  # queued
    exp.claim(token="t", lease_s=60, max_attempts=3)
    assert Experiment.report_progress(exp.pk, 0.5, 3.0, token="t")
    assert not Experiment.report_progress(exp.pk, 0.7, 1.0, token="other")
    exp.refresh_from_db()
    assert (exp.progress, exp.eta_s) == (0.5, 3.0)


def test_the_time_budget_is_the_jobs_limit_under_the_site_ceiling_less_what_ran(settings) -> None:
    settings.KD_MAX_JOB_SECONDS = 100
    assert time_budget_s({}, 0) == 100
    assert time_budget_s({"time_limit_s": 30.0}, 10) == 20
    assert time_budget_s({"time_limit_s": 1e9}, 0) == 100  # the site ceiling wins
    assert time_budget_s({"time_limit_s": 30.0}, 45) < 0  # spent by earlier deliveries: stops at once
