"""Serving: a continuous-batching engine and an OpenAI-compatible HTTP API.

The HTTP side needs the optional `serve` extra (fastapi, uvicorn); the engine needs only torch.
"""

from __future__ import annotations

from llamaworks.serve.engine import Engine, EngineStopped, Event, QueueFull, Request

__all__ = ["Engine", "EngineStopped", "Event", "QueueFull", "Request"]
