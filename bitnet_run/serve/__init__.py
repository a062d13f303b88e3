"""`bitnet-run serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)."""
from .app import ServeConfig, create_app
from .server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
