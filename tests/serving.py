"""A real `bitnet-run serve` in a subprocess on a free 127.0.0.1 port, for the server tests."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from bitnet_run.bench.serve import Launched, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo" / "demo.bnr"
START_TIMEOUT_S = 120


class ServerProcess(Launched):
    def __init__(self, log_dir: Path, *args: str, model: Path = DEMO):
        port = free_port()
        cmd = [sys.executable, "-m", "bitnet_run.cli", "serve", "-m", str(model), "--port", str(port), "-t", "1",
               *args]
        super().__init__(cmd, port, log_dir / f"serve-{port}.log", cwd=ROOT)

    def wait_ready(self) -> "ServerProcess":
        return super().wait_ready(START_TIMEOUT_S)

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"bitnet_run_{name} "):
                return float(line.split()[1])
        raise KeyError(name)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
