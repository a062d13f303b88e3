"""cffi (API mode) build of the C runtime into bitnet_run._bitnet.

Compiled on `pip install .`. The default build is portable (the runtime picks kernels by CPU feature
detection at run time); set BITNET_RUN_NATIVE=1 to add -march=native for this machine only.

The kernels are bit-exact with the scalar reference only if the compiler fuses no float multiply
and add that the source writes apart (where the order wants a fused one, the source says so: fmaf
and FMA intrinsics in the output head's dot products), so -ffp-contract=off is passed explicitly:
GCC's default outside strict ISO modes (-std=gnu11, and with -march=native on FMA CPUs) would fuse
them. tests/test_build_flags.py builds the runtime with `-std=gnu11 -march=native` and with clang and
checks every variant there too.
"""
import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"
# The public API, then the development one (kernel introspection, timing, bandwidth probe).
HEADERS = [RUNTIME / "include" / "bitnet.h", RUNTIME / "include" / "bitnet_dev.h"]


def _cdef_text() -> str:
    parts = []
    for header in HEADERS:
        match = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", header.read_text(), re.S)
        if match is None:
            raise RuntimeError(f"{header}: CDEF-BEGIN/CDEF-END markers not found")
        parts.append(match.group(1))
    return "\n".join(parts)


def _sources(absolute: bool) -> list[str]:
    # Relative paths (to ROOT, the working directory of `pip install`) keep absolute build paths out
    # of the extension's debug info; FFI.compile(tmpdir=...) works in tmpdir and needs absolute ones.
    paths = sorted((RUNTIME / "src").rglob("*.c"))
    return [str(p if absolute else p.relative_to(ROOT)) for p in paths]


def compile_args(extra: tuple[str, ...] = ()) -> list[str]:
    """The compiler flags: `extra` after the defaults, so that they win (-std=gnu11 over -std=c11),
    and -ffp-contract=off after everything."""
    args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]
    if os.environ.get("BITNET_RUN_NATIVE") == "1":
        args.append("-march=native")
    return args + list(extra) + ["-ffp-contract=off"]


def build_ffi(extra_args: tuple[str, ...] = (), absolute_paths: bool = False) -> FFI:
    """The cffi builder of the extension module bitnet_run._bitnet, compiled with compile_args(extra_args)."""
    ffi = FFI()
    ffi.cdef(_cdef_text())
    ffi.set_source(
        "bitnet_run._bitnet",
        "".join(f'#include "{h.name}"\n' for h in HEADERS),
        sources=_sources(absolute_paths),
        include_dirs=[str(RUNTIME / "include"), str(RUNTIME / "src")],
        extra_compile_args=compile_args(extra_args),
        libraries=["m", "pthread"],
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
