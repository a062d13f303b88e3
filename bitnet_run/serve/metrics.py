"""GET /metrics: the engine's counters and gauges in the Prometheus text format."""
from __future__ import annotations

import time

PREFIX = "bitnet_run_"


def render_metrics(engine) -> str:
    m = engine.metrics
    rows = [
        ("requests_total", "counter", "Completion requests accepted into the queue.", m.requests),
        ("requests_failed_total", "counter", "Requests that ended with an evaluation error.", m.requests_failed),
        ("requests_cancelled_total", "counter", "Requests whose client went away before the end.",
         m.requests_cancelled),
        ("prompt_tokens_total", "counter", "Prompt tokens received.", m.prompt_tokens),
        ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's cache instead of evaluated.",
         m.prompt_tokens_cached),
        ("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens),
        ("decode_steps_total", "counter", "Batches evaluated by the scheduler.", m.decode_steps),
        ("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
         round(m.tokens_per_second(time.monotonic()), 3)),
        ("queue_depth", "gauge", "Requests waiting for a free slot.", engine.queue_depth),
        ("slots_busy", "gauge", "Slots serving a request.", engine.busy_slots),
        ("slots_total", "gauge", "Slots (--parallel).", engine.n_parallel),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {value}"]
    return "\n".join(lines) + "\n"
