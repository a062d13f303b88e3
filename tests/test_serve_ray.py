"""bitnet_run.serve.ray: two replicas started locally answer through Ray Serve's HTTP proxy."""
from __future__ import annotations

import sys
import warnings

import pytest

try:
    with warnings.catch_warnings():  # ray's own pydantic models warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve
except ImportError as exc:  # ray publishes wheels for a limited set of Pythons and platforms
    reason = f"ray[serve] is not installed for Python {sys.version.split()[0]} ({exc}); pip install 'ray[serve]'"
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from serving import DEMO, free_port, wait_until  # noqa: E402

PROMPTS = ["Once upon a time", "The function returns", "In the beginning", "Python is"] * 3


@pytest.fixture(scope="module")
def proxy():
    from bitnet_run.serve import ServeConfig
    from bitnet_run.serve.ray import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(DEMO, n_parallel=2, n_threads=1)
        serve.run(deployment(config, num_replicas=2, num_cpus=0.5), name="bitnet-run", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        ready = lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200  # noqa: E731
        assert wait_until(ready, 120, interval=0.5), "the replicas did not become healthy"
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_the_proxy(proxy):
    from bitnet_run import Model

    reference = Model(DEMO, n_threads=1)
    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0, timeout=120)
    replicas = set()
    for prompt in PROMPTS:
        raw = client.completions.with_raw_response.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
        replicas.add(raw.headers["x-bitnet-run-replica"])
        assert raw.parse().choices[0].text == reference.generate(prompt, max_tokens=12, temperature=0,
                                                                  repeat_penalty=1.0)
    assert len(replicas) == 2, replicas
    chunks = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is 2 plus 2?"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
