"""Serving: an OpenAI-compatible HTTP API and the web chat page (`picochat serve`).

app.py: the routes (Starlette + uvicorn); scheduler.py: the model's worker thread and continuous
batching; protocol.py: request validation, OpenAI's error shape, per-choice text and stop strings;
static/: the web page.
"""

from .app import ServeConfig, create_app, serve, start_in_thread

__all__ = ["ServeConfig", "create_app", "serve", "start_in_thread"]
