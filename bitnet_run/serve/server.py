"""Runs the app under uvicorn: SIGTERM/SIGINT drain the streams in flight (bounded), then exit 0."""
from __future__ import annotations

import signal
import sys
import threading

import uvicorn

from .app import ServeConfig, create_app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, drain_timeout: float = 30.0,
          log_level: str = "info") -> int:
    """Serves until SIGTERM/SIGINT; returns the exit status (1 when the model fails to load)."""
    app = create_app(config)
    engine = app.state.engine
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=drain_timeout))

    def stop_on_load_error() -> None:
        if not engine.wait_loaded():
            print(f"error: {engine.error}", file=sys.stderr, flush=True)
            server.should_exit = True

    # uvicorn drains on the signal, then re-raises it under the handlers it found: with these no-ops
    # in place a drained shutdown ends with status 0 instead of dying by the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    watcher = threading.Thread(target=stop_on_load_error, daemon=True)
    try:
        watcher.start()
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if engine.state == "error" else 0
