"""The AArch64 (NEON) kernels without an ARM CPU: the runtime cross-compiled with aarch64-linux-gnu-gcc,
with tests/arm/runner.c (a pipe front end of bitnet.h) as its main, and run under qemu-aarch64 as a
CPU without the dot-product extension (Cortex-A53: ref, neon) and one with it (Cortex-A76: ref, neon,
neon-dotprod). Every kernel of every variant there must equal this machine's reference kernel bit
for bit (so the AArch64 reference too) on random, odd-shaped and extreme inputs, and the demo model's
logits there (as bundled, I2 with a bf16 head, and converted to TL1 with the 4-bit head, to TL2 with
the 8-bit head and to I2 with the 6-bit head)
must equal this machine's with BITNET_RUN_KERNELS=ref, with either KV cache type.

Needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (Debian/Ubuntu); skipped without
them unless BITNET_RUN_REQUIRE_ARM=1 (set by .ci/run), which makes their absence a failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet_run import Model
from bitnet_run import fileformat as ff
from test_float_kernels import attention_head, attention_inputs, quantize_rows, rows_of
from test_kernels import (
    ACT_KINDS, ENC_BF16, ENC_F16, ENC_F32, TL_W_KINDS, W_KINDS, _raw_eval, activations, dense_matmul,
    dense_weights, q8_case, q8_matmul, ternary_matmul, tl_weights, weights,
)
from test_quant_heads import KINDS as QB_KINDS
from test_quant_heads import QB, qb_case, quant_matmul

ROOT = Path(__file__).resolve().parent.parent
CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DEMO = ROOT / "models" / "demo" / "demo.bnr"
# A CPU without and one with the dot-product extension: qemu's models in order of preference (older
# qemu lacks the Cortex-A76; its "max" CPU has every extension it emulates), and the variants the
# runtime must offer there.
CPUS = {
    "no-dotprod": (["cortex-a53", "cortex-a72"], ["ref", "neon"]),
    "dotprod": (["cortex-a76", "neoverse-n1", "max"], ["ref", "neon", "neon-dotprod"]),
}
REQUEST_TIMEOUT_S = 300
EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _toolchain_or_skip() -> None:
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if not missing:
        return
    message = (f"{', '.join(missing)} not found (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
               "qemu-user)")
    if os.environ.get("BITNET_RUN_REQUIRE_ARM") == "1":
        pytest.fail(f"{message}; BITNET_RUN_REQUIRE_ARM=1 requires the AArch64 tests to run")
    pytest.skip(message)


def _cross_flags() -> list[str]:
    """The extension's flags (bitnet_run/_build.py), for a generic AArch64 CPU and warnings as errors."""
    from bitnet_run._build import compile_args

    flags = [f for f in compile_args() if not f.startswith("-march=")]
    return flags + ["-Werror", "-static"]


@pytest.fixture(scope="session")
def runner_binary(tmp_path_factory) -> Path:
    _toolchain_or_skip()
    from bitnet_run._build import _sources

    out = tmp_path_factory.mktemp("arm") / "runner"
    cmd = [CC, *_cross_flags(), "-Iruntime/include", "-Iruntime/src", *_sources(absolute=False), "tests/arm/runner.c",
           "-o", str(out), "-lm", "-lpthread"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the AArch64 build failed:\n{done.stderr}"
    return out


class Runner:
    """One runner process under qemu; request() sends a line and raw inputs, returns the outputs."""

    def __init__(self, binary: Path, kind: str):
        models = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True).stdout.split()  # exits 1
        self.cpu = next((m for m in CPUS[kind][0] if m in models), None)
        assert self.cpu, f"qemu-aarch64 has none of the CPU models {CPUS[kind][0]}"
        self.expected_variants = CPUS[kind][1]
        self.proc = subprocess.Popen([QEMU, "-cpu", self.cpu, str(binary)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.proc.stdin.write(b"variants\n")
        self.proc.stdin.flush()
        names, features = self.proc.stdout.readline().decode().split("|")
        self.variants, self.features = names.split(), features.split()

    def request(self, line: str, *inputs: np.ndarray) -> list[bytes]:
        watchdog = threading.Timer(REQUEST_TIMEOUT_S, self.proc.kill)  # a hung runner fails, not hangs, the test
        watchdog.start()
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            for a in inputs:
                self.proc.stdin.write(np.ascontiguousarray(a).tobytes())
            self.proc.stdin.flush()
            head = self.proc.stdout.readline().decode().split()
            assert head and head[0] == "ok", f"runner on {self.cpu}: {' '.join(head) or 'no reply (crashed?)'}"
            n, size = int(head[1]), int(head[2])
            data = self.proc.stdout.read(n * size)
        finally:
            watchdog.cancel()
        assert len(data) == n * size, f"runner on {self.cpu}: short reply"
        return [data[i * size:(i + 1) * size] for i in range(n)]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):  # it died (the test said so) or hangs
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", params=list(CPUS))
def arm(request, runner_binary):
    runner = Runner(runner_binary, request.param)
    yield runner
    runner.close()


def assert_same(arm: Runner, outputs: list[bytes], expected: np.ndarray) -> None:
    """Every variant's output equals `expected` (this machine's reference) bit for bit; where that is
    NaN, the NaN's bits may differ between the two machines (x86 and AArch64 make different default
    NaNs), so there only NaN is required, and on AArch64 every variant must agree with its reference."""
    want = np.ascontiguousarray(expected)
    bits = want.view(np.uint8).reshape(-1, want.itemsize)
    nan = np.isnan(want).reshape(-1) if want.dtype.kind == "f" else np.zeros(want.size, dtype=bool)
    for name, out in zip(arm.variants, outputs):
        got = np.frombuffer(out, dtype=want.dtype).reshape(want.shape)
        got_bits = got.view(np.uint8).reshape(-1, want.itemsize)
        mismatch = np.flatnonzero(np.any(got_bits != bits, axis=1) & ~nan)
        assert mismatch.size == 0, (f"{name} on {arm.cpu}: {mismatch.size} of {want.size} differ, first at flat "
                                    f"index {mismatch[0]}: {got.reshape(-1)[mismatch[0]]!r} != "
                                    f"{want.reshape(-1)[mismatch[0]]!r}")
        assert np.all(np.isnan(got.reshape(-1)[nan])), f"{name} on {arm.cpu}: a NaN became a number"
        assert out == outputs[0], f"{name} on {arm.cpu} differs from the AArch64 reference"


def test_variants_follow_the_cpu(arm):
    assert arm.variants == arm.expected_variants
    assert "asimd" in arm.features
    assert ("asimddp" in arm.features) == ("neon-dotprod" in arm.variants)


# ---- ternary weights ----

def _ternary(arm, encoding, x, w, rows, cols, n_threads):
    outs = arm.request(f"ternary {encoding} {n_threads} {x.shape[0]} {rows} {cols}", x.astype(np.int8), w)
    assert_same(arm, outs, ternary_matmul(0, encoding, x, w, rows, cols))


def _ternary_weights(kind: str, encoding: int, rows: int, cols: int, rng) -> np.ndarray:
    if encoding == ff.ENCODING_I2:
        return weights({"sparse": "valid"}.get(kind, kind), rows, cols, rng)
    return tl_weights({"code3": "bytes"}.get(kind, kind), encoding, rows, cols, rng)


@EXAMPLES
@given(
    encoding=st.sampled_from([ff.ENCODING_I2, ff.ENCODING_TL1, ff.ENCODING_TL2]),
    rows=st.one_of(st.integers(1, 70), st.sampled_from([31, 32, 33, 64, 65])),
    cols=st.one_of(st.integers(1, 200), st.sampled_from([63, 64, 65, 127, 128, 129, 191, 192, 193, 385, 1025])),
    n_tok=st.integers(1, 9),
    act_kind=st.sampled_from(ACT_KINDS),
    w_kind=st.sampled_from(sorted(set(W_KINDS) | set(TL_W_KINDS))),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ternary_kernels(arm, encoding, rows, cols, n_tok, act_kind, w_kind, n_threads, seed):
    rng = np.random.default_rng(seed)
    x = activations(act_kind, n_tok, cols, rng)
    _ternary(arm, encoding, x, _ternary_weights(w_kind, encoding, rows, cols, rng), rows, cols, n_threads)


@pytest.mark.parametrize("encoding", [ff.ENCODING_I2, ff.ENCODING_TL1, ff.ENCODING_TL2], ids=["i2", "tl1", "tl2"])
def test_ternary_extremes_and_layer_shapes(arm, encoding):
    """The largest |dot|: all -128 (or 127) against all +1 (or -1) over long rows (int16 partial sums
    would overflow); then a 2B-4T row length with many table blocks and tokens over one group."""
    rows, cols = 33, 8192 + 13
    for act_kind in ("min", "max"):
        for w_kind in ("plus", "minus"):
            rng = np.random.default_rng(0)
            x = activations(act_kind, 5, cols, rng)
            _ternary(arm, encoding, x, _ternary_weights(w_kind, encoding, rows, cols, rng), rows, cols, 1)
    rng = np.random.default_rng(1)
    for rows, cols, n_tok in [(96, 2560, 1), (40, 6912, 6)]:
        x = activations("random", n_tok, cols, rng)
        _ternary(arm, encoding, x, _ternary_weights("bytes", encoding, rows, cols, rng), rows, cols, 2)


# ---- the output head ----

@EXAMPLES
@given(
    rows=st.integers(1, 40),
    cols=st.one_of(st.integers(1, 200), st.sampled_from([1031, 2560])),
    n_tok=st.integers(1, 9),
    encoding=st.sampled_from([ENC_F32, ENC_F16, ENC_BF16]),
    nonfinite=st.booleans(),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dense_kernels(arm, rows, cols, n_tok, encoding, nonfinite, n_threads, seed):
    rng = np.random.default_rng(seed)
    w = dense_weights(encoding, rows, cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    if nonfinite:  # infinities and NaNs in the activations (all NaNs alike: compilers may swap a product's operands)
        x.flat[rng.integers(0, x.size, max(1, x.size // 50))] = rng.choice([np.nan, np.inf, -np.inf])
    outs = arm.request(f"dense {encoding} {n_threads} {n_tok} {rows} {cols}", x, w)
    assert_same(arm, outs, dense_matmul(0, x, w, encoding))


@EXAMPLES
@given(
    rows=st.integers(1, 40),
    cols=st.one_of(st.integers(1, 200), st.sampled_from([1031, 4099])),
    n_tok=st.integers(1, 9),
    kind=st.sampled_from(["random", "extreme", "max"]),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_q8_kernels(arm, rows, cols, n_tok, kind, n_threads, seed):
    x, xs, w = q8_case(kind, n_tok, rows, cols, np.random.default_rng(seed))
    outs = arm.request(f"q8 {n_threads} {n_tok} {rows} {cols}", x, xs, w)
    assert_same(arm, outs, q8_matmul(0, x, xs, w, rows, cols))


@EXAMPLES
@given(
    encoding=st.sampled_from(QB),
    rows=st.integers(1, 40),
    cols=st.one_of(st.integers(1, 200), st.sampled_from([511, 513, 1031, 4097])),
    n_tok=st.integers(1, 9),
    kind=st.sampled_from(QB_KINDS),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_qb_kernels(arm, encoding, rows, cols, n_tok, kind, n_threads, seed):
    """The 6- and 4-bit heads (tests/test_quant_heads.py's cases: any bytes, the extremes)."""
    x, xs, w = qb_case(kind, encoding, n_tok, rows, cols, np.random.default_rng(seed))
    outs = arm.request(f"quant {encoding} {n_threads} {n_tok} {rows} {cols}", x, xs, w)
    assert_same(arm, outs, quant_matmul(0, encoding, x, xs, w, rows, cols))


@pytest.mark.parametrize("encoding", QB, ids=["q6", "q4"])
def test_qb_long_rows(arm, encoding):
    """Rows whose sum of scaled block dots passes 2^31 (int32 group sums widened to 64 bits)."""
    rng = np.random.default_rng(2)
    for kind in ("max", "min", "alternating"):
        x, xs, w = qb_case(kind, encoding, 3, 5, 16384 + 97, rng)
        outs = arm.request(f"quant {encoding} 2 3 5 {16384 + 97}", x, xs, w)
        assert_same(arm, outs, quant_matmul(0, encoding, x, xs, w, 5, 16384 + 97))


# ---- activation quantization and attention ----

@EXAMPLES
@given(
    cols=st.one_of(st.integers(1, 100), st.sampled_from([15, 16, 17, 255, 256, 257, 2560])),
    n_rows=st.integers(1, 4),
    kind=st.sampled_from(["random", "outliers", "ties", "zero", "tiny", "nonfinite"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_kernels(arm, cols, n_rows, kind, seed):
    x = rows_of(kind, n_rows, cols, np.random.default_rng(seed))
    q, s = quantize_rows(0, x)
    outs = arm.request(f"quantize {n_rows} {cols}", x)
    assert_same(arm, [o[: q.size] for o in outs], q)
    assert_same(arm, [o[q.size:] for o in outs], s)


@EXAMPLES
@given(
    n_pos=st.integers(1, 100),
    D=st.one_of(st.sampled_from([8, 16, 64, 128]), st.integers(1, 40)),
    extra=st.sampled_from([0, 0, 4, 37]),
    spread=st.sampled_from([1e-3, 1.0, 30.0]),
    kv=st.sampled_from(["f32", "f16"]),
    kv_scale=st.sampled_from([1.0, 1e-6, 300.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_kernels(arm, n_pos, D, extra, spread, kv, kv_scale, seed):
    """Both attention kernels: over a float cache, and over an f16 one (k, v rounded to f16, kv_scale
    1e-6 making most of them subnormal)."""
    q, k, v = attention_inputs(n_pos, D, D + extra, np.random.default_rng(seed), spread, kv_scale)
    scale = np.float32(1.0 / np.sqrt(D))
    outs = arm.request(f"attention {kv} {n_pos} {D} {D + extra} {int(scale.view(np.uint32))}", q, k, v)
    assert_same(arm, outs, attention_head(0, q, k, v, D, float(scale), kv))


# ---- the whole model ----

PROMPTS = ["Once upon a time", "The little dog ran to the park and", "1 2 3"]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> dict[str, Path]:
    """The bundled demo model (I2, bf16 head) and its checkpoint converted to TL1 with the 4-bit head,
    to TL2 with the 8-bit head and to I2 with the 6-bit head, so that every kernel runs in a whole model."""
    from bitnet_run.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("demo")
    return {
        "i2-bf16": DEMO,
        "tl1-q4": convert_checkpoint(DEMO.parent, root / "tl1-q4.bnr", weights="tl1", head="q4"),
        "tl2-q8": convert_checkpoint(DEMO.parent, root / "tl2-q8.bnr", weights="tl2", head="q8"),
        "i2-q6": convert_checkpoint(DEMO.parent, root / "i2-q6.bnr", head="q6"),
    }


def _reference_logits(path: Path, kv: str) -> list[tuple[list[int], np.ndarray]]:
    """The prompts' tokens and logits on this machine with the reference kernels and a KV cache of type kv."""
    saved = os.environ.get("BITNET_RUN_KERNELS")
    os.environ["BITNET_RUN_KERNELS"] = "ref"
    try:
        model = Model(path, n_threads=2, kv_type=kv)
        cases = [(ids, _raw_eval(model, ids)) for ids in (model.tokenize(p) for p in PROMPTS)]
        del model
    finally:
        if saved is None:
            os.environ.pop("BITNET_RUN_KERNELS")
        else:
            os.environ["BITNET_RUN_KERNELS"] = saved
    return cases


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("model", ["i2-bf16", "tl1-q4", "tl2-q8", "i2-q6"])
def test_demo_logits_equal_this_machines_reference(arm, demo_models, model, kv):
    """Prompt logits (all positions) and one decoding step, every AArch64 variant at 2 threads, with
    the default (f16) KV cache and with a float one."""
    path = demo_models[model]
    for ids, expected in _reference_logits(path, kv):
        assert np.all(np.isfinite(expected))
        for variant, name in enumerate(arm.variants):
            (out,) = arm.request(f"logits {variant} 2 {kv} {len(ids)} {path}", np.asarray(ids, dtype=np.int32))
            got = np.frombuffer(out, dtype=np.float32).reshape(expected.shape)
            np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32),
                                          err_msg=f"{model}, {kv} cache: {name} on {arm.cpu}, prompt {ids}")


# ---- each build compiles the other architecture's kernels out ----

def test_each_build_compiles_the_other_isa_out(runner_binary, tmp_path):
    """The AArch64 build holds no x86 kernel symbols and the native x86-64 build no NEON ones; both
    compile those files without a warning (-Werror)."""
    native = shutil.which("cc") or shutil.which("gcc")
    if native is None or os.uname().machine != "x86_64":
        pytest.skip("needs a native x86-64 compiler")
    from bitnet_run._build import compile_args

    cases = [(native, [*compile_args(), "-Werror"], "runtime/src/arch/arm/kernels_neon.c", "nm"),
             (CC, _cross_flags(), "runtime/src/arch/x86/kernels_avx2.c", "aarch64-linux-gnu-nm"),
             (CC, _cross_flags(), "runtime/src/arch/x86/kernels_avx512vnni.c", "aarch64-linux-gnu-nm")]
    for cc, flags, src, nm in cases:
        obj = tmp_path / (Path(src).stem + ".o")
        done = subprocess.run([cc, *flags, "-Iruntime/include", "-Iruntime/src", "-c", src, "-o", str(obj)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        symbols = subprocess.run([shutil.which(nm) or "nm", "--defined-only", str(obj)], capture_output=True,
                                 text=True, check=True).stdout.split()
        assert symbols == [], f"{src} built by {cc} defines {symbols}"
