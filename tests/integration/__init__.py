"""Integration tests: a real Redis, Celery worker process, web server (uvicorn) and WebSocket client."""
