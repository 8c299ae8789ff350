"""The Celery app object: broker from Django settings, two queues, one training job per worker at a time.

The web process only enqueues by task name (`send_task`); the tasks live in `workers/` and are
imported by the worker alone (settings.CELERY_IMPORTS), so importing this module never imports them.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("kd_studio")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_queues=(Queue("gpu"), Queue("default")),
    task_default_queue="default",
    task_routes={"workers.run_experiment": {"queue": "gpu"}},
    # A training job holds a GPU for minutes to hours: take one at a time, acknowledge it only
    # when done, and put it back if the worker process dies mid-run.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # The database is the state of record; nobody reads Celery results.
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # Celery beat (embedded `-B` in `make run`'s worker, the `beat` service in docker-compose.yml).
    beat_schedule={
        "cleanup": {
            "task": "workers.cleanup",
            "schedule": float(os.environ.get("KD_CLEANUP_EVERY_S", "3600")),
            "options": {"queue": "default"},
        },
        # Finishes a spread codistillation whose last group died after the others returned (its
        # message would otherwise wait CELERY_VISIBILITY_TIMEOUT for redelivery).
        "codistill-watchdog": {
            "task": "workers.codistill_watchdog",
            "schedule": float(os.environ.get("KD_CODISTILL_WATCHDOG_EVERY_S", "60")),
            "options": {"queue": "default", "expires": 60},
        },
    },
)
