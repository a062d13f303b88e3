"""cffi (API mode) build of the C runtime into bitnet_run._bitnet.

Compiled on `pip install .`. The default build is portable (the runtime picks kernels by CPU feature
detection at run time); set BITNET_RUN_NATIVE=1 to add -march=native for this machine only.
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


def _sources() -> list[str]:
    # Relative paths keep absolute build paths out of the extension's debug info.
    return sorted(str(p.relative_to(ROOT)) for p in (RUNTIME / "src").rglob("*.c"))


def _compile_args() -> list[str]:
    args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]
    if os.environ.get("BITNET_RUN_NATIVE") == "1":
        args.append("-march=native")
    return args


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "bitnet_run._bitnet",
    "".join(f'#include "{h.name}"\n' for h in HEADERS),
    sources=_sources(),
    include_dirs=[str(RUNTIME / "include"), str(RUNTIME / "src")],
    extra_compile_args=_compile_args(),
    libraries=["m", "pthread"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
