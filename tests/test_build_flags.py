"""Bit-exactness by construction: the runtime compiled with other flags and another compiler
(`-std=gnu11 -march=native`, where GCC would fuse the reference's multiplies and adds into FMAs
without the build's -ffp-contract=off; clang) still gives every kernel variant bit for bit equal to
the scalar reference, and that reference equals the default build's. A third build compiles the
AVX-VNNI variant with the EVEX form of vpdpbusd (-DBN_AVXVNNI_EVEX, kernels_avxvnni.c), so that its
kernel runs and is checked on CPUs with AVX-512 VNNI but without AVX-VNNI.

Each build is a second copy of the extension in a temporary directory, loaded beside the installed
one (importlib; its C symbols stay local to it). The checks are the ones of tests/test_kernels.py,
tests/test_float_kernels.py and tests/test_quant_heads.py, run with their module-level `lib`/`ffi`
swapped for the copy's."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_float_kernels as tf
import test_kernels as tk
import test_quant_heads as tq
from bitnet_run._bitnet import ffi as default_ffi
from bitnet_run._bitnet import lib as default_lib

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {"gcc-gnu11-native": ("gcc", ("-std=gnu11", "-march=native")),
          "clang-gnu11-native": ("clang", ("-std=gnu11", "-march=native")),
          "gcc-avxvnni-evex": ("gcc", ("-DBN_AVXVNNI_EVEX",))}
FAST_NAMES = ["avx2", "avxvnni", "avx512vnni"]  # every non-reference variant of the registry (kernels.c)


def build_copy(cc: str, extra: tuple[str, ...], tmp: Path):
    """Compiles the runtime with compiler `cc` and bitnet_run/_build.py's flags + `extra` into tmp;
    returns the loaded copy of the extension module."""
    if shutil.which(cc) is None:
        pytest.skip(f"compiler {cc} is not installed")
    script = ("import runpy, sys; b = runpy.run_path('bitnet_run/_build.py'); "
              f"b['build_ffi']({extra!r}, absolute_paths=True).compile(tmpdir=sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp)], cwd=ROOT, env={**os.environ, "CC": cc},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (so,) = (tmp / "bitnet_run").glob("_bitnet*.so")
    spec = importlib.util.spec_from_file_location(f"bitnet_copy_{cc}._bitnet", so)  # init symbol: PyInit__bitnet
    # cffi's module init registers itself as bitnet_run._bitnet(.lib) in sys.modules: put the
    # installed module back, so that everything else keeps using it
    saved = {k: sys.modules[k] for k in ("bitnet_run._bitnet", "bitnet_run._bitnet.lib") if k in sys.modules}
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k in ("bitnet_run._bitnet", "bitnet_run._bitnet.lib"):
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return module


@pytest.fixture(scope="module", params=list(BUILDS), ids=list(BUILDS))
def copy(request, tmp_path_factory):
    cc, extra = BUILDS[request.param]
    return build_copy(cc, extra, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def use_copy(copy, monkeypatch):
    """tk's, tf's and tq's helpers call the copy from here on."""
    for mod in (tk, tf, tq):
        monkeypatch.setattr(mod, "lib", copy.lib)
        monkeypatch.setattr(mod, "ffi", copy.ffi)
    copy.names = [copy.ffi.string(copy.lib.bn_kernels_name(i)).decode() for i in range(copy.lib.bn_kernels_count())]
    assert set(tk.VARIANTS) <= set(copy.names)  # chosen at run time, not by -march: at least the same
    return copy


def reference_outputs(seed: int) -> list[np.ndarray]:
    """The scalar reference's float kernels (the integer ones are exact in any order) on fixed inputs,
    through tk's and tf's current `lib`: dense heads in each encoding, quantization, attention."""
    rng = np.random.default_rng(seed)
    out = []
    for encoding in (tk.ENC_F32, tk.ENC_F16, tk.ENC_BF16):
        w = tk.dense_weights(encoding, 37, 333, rng)
        out.append(tk.dense_matmul(0, rng.standard_normal((3, 333)).astype(np.float32), w, encoding))
    out.extend(tf.quantize_rows(0, tf.rows_of("random", 3, 333, rng)))
    q, k, v = tf.attention_inputs(77, 64, 80, rng, 1.0)
    out.append(tf.attention_head(0, q, k, v, 64, 0.125))
    return out


def test_reference_equals_the_default_build(use_copy):
    got = reference_outputs(0)
    with pytest.MonkeyPatch.context() as mp:
        for mod in (tk, tf):
            mp.setattr(mod, "lib", default_lib)
            mp.setattr(mod, "ffi", default_ffi)
        want = reference_outputs(0)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


def test_references_match_numpy(use_copy):
    for act_kind in tk.ACT_KINDS:
        for w_kind in tk.W_KINDS:
            tk.test_reference_matches_numpy(act_kind, w_kind)
        for encoding in tk.TL_ENCODINGS:
            tk.test_tl_reference_matches_numpy(encoding, act_kind, "bytes")
    for encoding in (tk.ENC_F32, tk.ENC_F16, tk.ENC_BF16):
        tk.test_dense_reference_close_to_numpy(encoding)
    for kind in ("random", "extreme", "max"):
        tk.test_q8_reference_matches_numpy(kind)
    for encoding in tq.QB:
        for kind in tq.KINDS:
            tq.test_qb_reference_matches_numpy(encoding, kind)
    for kind in ("random", "outliers", "ties", "zero", "tiny"):
        tf.test_quantize_reference_matches_numpy(kind)
    tf.test_attention_reference_matches_numpy()
    tf.test_attention_f16_reference_is_the_float_one_on_rounded_values()


@pytest.mark.parametrize("name", FAST_NAMES)
def test_variants_match_reference(use_copy, name):
    """tests/test_kernels.py's, test_float_kernels.py's and test_quant_heads.py's hypothesis checks of every variant."""
    if name not in use_copy.names:
        pytest.skip(f"{name} is not usable on this CPU in this build")
    variant = use_copy.names.index(name)
    tk.test_i2_variant_matches_reference(variant=variant)
    tk.test_i2_extremes_saturate_nothing(variant)
    tk.test_i2_variant_layer_shapes(variant, 640, 2560, 67)
    for encoding in tk.TL_ENCODINGS:
        tk.test_tl_variant_matches_reference(encoding=encoding, variant=variant)
        tk.test_tl_variant_layer_shapes(encoding, variant, 640, 2560, 67)
    tk.test_dense_variant_matches_reference(variant=variant)
    tk.test_q8_variant_matches_reference(variant=variant)
    for encoding in tq.QB:
        tq.test_qb_variant_matches_reference(encoding=encoding, variant=variant)
        tq.test_qb_long_rows_and_head_shapes(encoding, variant)
    tf.test_quantize_variant_matches_reference(variant=variant)
    for kv in ("f32", "f16"):
        tf.test_attention_variant_matches_reference(variant=variant, kv=kv)
