"""Shared fixtures: one real stack per test session (see tests/stack.py) and an API client on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.client import Api
from tests.stack import ROOT, Stack, start_stack

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A running stack (DB, Redis, one Celery worker, uvicorn) shared by the whole session."""
    if not (ROOT / "manage.py").exists():
        pytest.skip("the web app (manage.py) is not there yet")
    # Uploads above 1 MiB are ingested by the worker (workers.ingest_dataset), so a test can reach
    # that path with a small file; the demo files the other tests upload stay below it.
    stack = start_stack(tmp_path_factory.mktemp("stack"), extra_env={"KD_SYNC_INSPECT_MAX_BYTES": "1048576"})
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def api(live_stack: Stack) -> Api:
    """Token client for the user `it-owner`."""
    return Api(live_stack.url, live_stack.make_user("it-owner", "it-owner-pw-1234"))
