"""The defended prediction service (docs/design.md §service) and its HTTP client.

``create_app(load_config("serve.toml"))`` builds the FastAPI app; ``mirage serve --config FILE``
runs it under uvicorn; :class:`HTTPPredictionAPI` lets every attack query it.
"""

from __future__ import annotations

from mirage.serve.auth import hash_key, new_key
from mirage.serve.client import HTTPPredictionAPI, ServerError
from mirage.serve.config import ClientConfig, ServeConfig, load_config

__all__ = [
    "ClientConfig",
    "HTTPPredictionAPI",
    "ServeConfig",
    "ServerError",
    "create_app",
    "hash_key",
    "load_config",
    "new_key",
]


def __getattr__(name: str):
    if name == "create_app":  # fastapi is imported only by the server side
        from mirage.serve.app import create_app

        return create_app
    raise AttributeError(name)
