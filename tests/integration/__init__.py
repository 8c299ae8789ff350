"""Integration tests: a real Redis, Celery worker process, daphne server and WebSocket client."""
