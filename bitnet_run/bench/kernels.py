"""Times the weight kernels (every variant usable on this CPU) on given matrix shapes, through the C
runtime's bn_kernels_time (random data, the runtime's own thread pool splitting rows).

    from bitnet_run.bench.kernels import time_kernels, LAYER_SHAPES_2B4T
    rows = time_kernels(LAYER_SHAPES_2B4T, threads=2, repeats=20)

Run as `python -m bitnet_run.bench.kernels` for a table."""
from __future__ import annotations

import statistics

from .. import fileformat as ff
from .._bitnet import ffi, lib

ENCODINGS = {e.option: e.id for e in ff.ENCODINGS.values()}  # "i2" -> 3, ...
TERNARY = tuple(ff.WEIGHT_ENCODINGS)
# (name, rows, cols) of the BitLinears of BitNet b1.58 2B-4T (hidden 2560, intermediate 6912, 5 kv heads of 128).
LAYER_SHAPES_2B4T = [
    ("q/o_proj", 2560, 2560),
    ("k/v_proj", 640, 2560),
    ("gate/up_proj", 6912, 2560),
    ("down_proj", 2560, 6912),
]
HEAD_SHAPE_2B4T = ("lm_head", 128256, 2560)


def variants() -> list[str]:
    return [ffi.string(lib.bn_kernels_name(i)).decode() for i in range(lib.bn_kernels_count())]


def cpu_features() -> str:
    return ffi.string(lib.bn_kernels_cpu_features()).decode()


def _weight_bytes(encoding: str, rows: int, cols: int) -> int:
    return ff.encoded_nbytes(ENCODINGS[encoding], (rows, cols))


def time_kernels(
    shapes,
    threads: int = 1,
    repeats: int = 10,
    n_toks=(1, 128),
    encoding: str = "i2",
    kernels: list[str] | None = None,
    cold_bytes: int = 0,
) -> list[dict]:
    """One dict per (shape, n_tok, variant): name, rows, cols, n_tok, variant, threads, encoding,
    seconds (median per call), best_seconds, weight_gbps (weight bytes / median time), gmacs (rows*cols*n_tok
    multiply-adds per second / 1e9) and speedup (ref median / this median).

    shapes: (rows, cols) or (name, rows, cols) tuples. kernels: variant names (default: all usable here).
    cold_bytes: cycle through weight copies totalling at least this many bytes, so that the weights
    come from memory rather than cache (0: one copy, which stays cache-warm when it fits)."""
    names = variants()
    chosen = kernels or names
    unknown = [k for k in chosen if k not in names]
    if unknown:
        raise ValueError(f"kernel variant(s) {unknown} not usable on this CPU (have {names})")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    results = []
    for shape in shapes:
        name, rows, cols = shape if len(shape) == 3 else (f"{shape[0]}x{shape[1]}", *shape)
        for n_tok in n_toks:
            ref_median = None
            for variant in (["ref"] if "ref" not in chosen else []) + list(chosen):
                secs = ffi.new("double[]", repeats)
                status = lib.bn_kernels_time(
                    names.index(variant), ENCODINGS[encoding], threads, n_tok, rows, cols, repeats, cold_bytes, secs
                )
                if status != lib.BN_OK:
                    raise RuntimeError(f"bn_kernels_time failed with status {status}")
                times = list(secs)
                median = statistics.median(times)
                if variant == "ref":
                    ref_median = median
                    if "ref" not in chosen:
                        continue
                results.append(
                    dict(
                        name=name, rows=rows, cols=cols, n_tok=n_tok, variant=variant, threads=threads,
                        encoding=encoding, seconds=median, best_seconds=min(times),
                        weight_gbps=_weight_bytes(encoding, rows, cols) / median / 1e9,
                        gmacs=rows * cols * n_tok / median / 1e9,
                        speedup=ref_median / median,
                    )
                )
    return results


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--n-tok", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--encodings", nargs="+", default=list(TERNARY), choices=TERNARY,
                    help="ternary weight encodings to time (default: all)")
    ap.add_argument("--head", action="store_true", help="also time the output head (128256 x 2560): bf16, q8, q6, q4")
    ap.add_argument("--cold-mb", type=int, default=0, help="cycle through this many MB of weight copies")
    args = ap.parse_args()
    print(f"variants: {variants()}  cpu: {cpu_features()}  threads: {args.threads}")
    runs = [(e, LAYER_SHAPES_2B4T) for e in args.encodings] + ([(e, [HEAD_SHAPE_2B4T]) for e in ("bf16", "q8", "q6", "q4")] if args.head else [])
    print(f"{'shape':>14} {'rows':>6} {'cols':>5} {'n_tok':>5} {'enc':>4} {'kernel':>6} {'ms/call':>9} {'GB/s':>7} "
          f"{'GMAC/s':>8} {'x ref':>6}")
    for encoding, shapes in runs:
        for r in time_kernels(shapes, args.threads, args.repeats, args.n_tok, encoding, cold_bytes=args.cold_mb << 20):
            print(f"{r['name']:>14} {r['rows']:>6} {r['cols']:>5} {r['n_tok']:>5} {encoding:>4} {r['variant']:>6} "
                  f"{r['seconds'] * 1e3:>9.3f} {r['weight_gbps']:>7.2f} {r['gmacs']:>8.2f} {r['speedup']:>6.2f}")


if __name__ == "__main__":
    _main()
