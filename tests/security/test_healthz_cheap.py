"""/healthz answers anyone, so a flood of it must not cost a Celery ping (0.5 s in the sync thread) per call."""

from __future__ import annotations

import time

import pytest

from webapp.studio import api

pytestmark = pytest.mark.django_db


def test_a_flood_of_health_checks_probes_once(settings, anon_client, monkeypatch) -> None:
    settings.KD_HEALTHZ_CACHE_S = 30
    api._health_cache.clear()
    probes = []
    real = api._check_health
    monkeypatch.setattr(api, "_check_health", lambda: probes.append(1) or real())
    first = anon_client.get("/healthz")
    started = time.monotonic()
    answers = [anon_client.get("/healthz") for _ in range(50)]
    assert time.monotonic() - started < 2.0  # 50 probes would take 25 s of Celery pings
    assert len(probes) == 1
    # The same contract (shared/API.md): the same body and code as the probe gave.
    assert {(a.status_code, a.content) for a in answers} == {(first.status_code, first.content)}
    assert set(first.json()) >= {"db", "redis", "workers"}


def test_a_changed_configuration_or_an_old_answer_probes_again(settings, anon_client, monkeypatch) -> None:
    settings.KD_HEALTHZ_CACHE_S = 30
    api._health_cache.clear()
    probes = []
    real = api._check_health
    monkeypatch.setattr(api, "_check_health", lambda: probes.append(1) or real())
    anon_client.get("/healthz")
    settings.KD_HEALTHZ_MIN_WORKERS = 0  # another verdict: not answered from the old entry
    anon_client.get("/healthz")
    assert len(probes) == 2
    settings.KD_HEALTHZ_CACHE_S = 0
    anon_client.get("/healthz")
    assert len(probes) == 3
