"""A job whose training step runs out of GPU memory fails with advice, through the Celery task; the worker lives on.

The task runs in this process (`Task.apply`: Celery's own execution of the real task, no broker round trip);
kd_core builds the student through `build_model`, which this test wraps in a model that raises the CUDA
allocator's exception at its third training forward. Everything else is the real job path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from webapp.studio.models import Experiment

CUDA_MESSAGE = "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 23.54 GiB"


class RunsOutOfMemory(nn.Module):
    """The student, running out of memory at its third training forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > 2:
                raise torch.OutOfMemoryError(CUDA_MESSAGE)
        return self.inner(x)


@pytest.fixture
def budget(monkeypatch) -> dict[str, bool]:
    """{"tight": True}: students built meanwhile run out of memory; False: the real students."""
    import kd_core.models

    budget = {"tight": True}
    real = kd_core.models.build_model

    def build(*args, **kw):
        model = real(*args, **kw)
        return RunsOutOfMemory(model) if budget["tight"] else model

    monkeypatch.setattr(kd_core.models, "build_model", build)
    return budget


def _submit(client, dataset_id: int) -> Experiment:
    body = {"kind": "train", "dataset": dataset_id, "epochs": 3, "batch_size": 16,
            "model": {"arch": "mlp", "hidden": [8]}}  # fmt: skip
    response = client.post("/api/experiments/", body, content_type="application/json")
    assert response.status_code == 201, response.content
    return Experiment.objects.get(pk=response.json()["id"])


@pytest.mark.django_db(transaction=True)
def test_an_out_of_memory_job_fails_with_advice_and_the_next_job_runs(
    owner, make_dataset, owner_client, settings, tmp_path, budget
):
    from workers.tasks import run_experiment

    settings.KD_STATE_DIR = settings.STATE_DIR = str(tmp_path / "state")
    dataset = make_dataset(owner, n=90, classes=3)
    exp = _submit(owner_client, dataset["id"])
    outcome = run_experiment.apply(args=[exp.pk], task_id=exp.celery_task_id)
    assert outcome.successful(), outcome.traceback  # the task returned: no dead worker, no redelivery
    assert outcome.result == Experiment.FAILED
    exp.refresh_from_db()
    assert exp.status == Experiment.FAILED
    assert "ran out at training step 3 with batch_size 16" in exp.error, exp.error
    assert "try batch_size 8 or smaller" in exp.error and "internal error" not in exp.error

    budget["tight"] = False  # the same process takes the next job
    nxt = _submit(owner_client, dataset["id"])
    assert run_experiment.apply(args=[nxt.pk], task_id=nxt.celery_task_id).result == Experiment.SUCCEEDED
    nxt.refresh_from_db()
    assert nxt.status == Experiment.SUCCEEDED and nxt.metrics["precision"] == "fp32"
    assert nxt.metrics["process_peak_rss_mb"] > 0
