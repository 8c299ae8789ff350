"""Celery tasks for KD Studio: thin wrappers that load a job by id, call kd_core, and record the outcome."""
