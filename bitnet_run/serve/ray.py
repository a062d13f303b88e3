"""The same app as `bitnet-run serve` as a Ray Serve deployment: N replicas behind Serve's HTTP proxy.

Each replica is one process with its own model mapping, context and scheduler (continuous batching
inside the replica); Serve's proxy spreads requests over the replicas. Needs the `serve-ray` extra:

    pip install 'bitnet-run[serve-ray]'
    python -m bitnet_run.serve.ray -m MODEL.bnr --replicas 2 --port 8000 [--parallel 4] [-t 1]

Every response carries the answering replica's id in the `x-bitnet-run-replica` header.
Several machines: docs/serving.md.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ray import serve

from .app import ServeConfig, create_app

REPLICA_HEADER = b"x-bitnet-run-replica"


class _ReplicaHeader:
    """ASGI middleware: names the replica that answered in every HTTP response."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def deployment(config: ServeConfig, num_replicas: int = 2, num_cpus: float = 1.0):
    """A bound Serve application of `num_replicas` replicas, each reserving `num_cpus` Ray CPUs."""

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=config.n_parallel + config.max_queue)
    @serve.ingress()
    class BitNetRun:
        def __init__(self, config: ServeConfig):
            self.config = config

        def __serve_build_asgi_app__(self):
            app = create_app(self.config)
            app.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
            return app

    return BitNetRun.bind(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitnet_run.serve.ray", description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", type=Path, required=True, help="model file (.bnr)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--parallel", type=int, default=4, help="slots per replica")
    parser.add_argument("-c", "--ctx-size", type=int, default=None)
    parser.add_argument("-t", "--threads", type=int, default=1, help="threads per replica")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (ray start --head ...)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"{args.model}: no such model file")
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")

    import ray

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    config = ServeConfig(args.model.resolve(), n_parallel=args.parallel, n_ctx=args.ctx_size, n_threads=args.threads,
                         api_key=args.api_key)
    serve.run(deployment(config, args.replicas, num_cpus=args.threads), name="bitnet-run", route_prefix="/")
    print(f"bitnet-run on Ray Serve: http://{args.host}:{args.port}/v1 ({args.replicas} replicas)", file=sys.stderr)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
