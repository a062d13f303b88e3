"""The thread pool (runtime/src/threadpool.c): under many tiny runs with random thread counts every
worker runs every task exactly once and is done when the run returns; the default thread count is
the number of physical cores."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bitnet_run._bitnet import ffi, lib


def stress(n_threads: int, n_runs: int, seed: int) -> tuple[np.ndarray, int]:
    counts = np.zeros((n_runs, n_threads), dtype=np.uint32)
    early = ffi.new("uint32_t *")
    assert lib.bn_pool_stress(n_threads, n_runs, seed, ffi.from_buffer("uint32_t[]", counts), early) == lib.BN_OK
    return counts, early[0]


def test_every_worker_runs_every_task_exactly_once():
    rng = np.random.default_rng(0)
    for _ in range(24):
        n_threads, n_runs = int(rng.integers(1, 10)), int(rng.integers(1, 400))
        counts, early = stress(n_threads, n_runs, int(rng.integers(0, 2**63)))
        assert early == 0, f"{early} tasks unfinished when bn_pool_run returned ({n_threads} threads)"
        np.testing.assert_array_equal(counts, 1, err_msg=f"{n_threads} threads, {n_runs} runs")


def test_stress_refuses_bad_arguments():
    counts = np.zeros(4, dtype=np.uint32)
    early = ffi.new("uint32_t *")
    buf = ffi.from_buffer("uint32_t[]", counts)
    assert lib.bn_pool_stress(0, 1, 0, buf, early) == lib.BN_ERR_ARG
    assert lib.bn_pool_stress(1025, 1, 0, buf, early) == lib.BN_ERR_ARG
    assert lib.bn_pool_stress(1, 1, 0, ffi.NULL, early) == lib.BN_ERR_ARG


def physical_cores() -> int:
    """Distinct (package, core) pairs of the CPUs this process may run on, from sysfs."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    return len(cores)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity mask on this OS")
def test_default_thread_count_is_the_physical_cores():
    from bitnet_run import Model

    assert lib.bn_default_n_threads() == physical_cores()
    assert Model(Path(__file__).parent.parent / "models" / "demo" / "demo.bnr").n_threads == physical_cores()
