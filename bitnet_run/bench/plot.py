#!/usr/bin/env python3
"""Plot the JSON output of `bitnet-run bench -o json` (peer rows included) as one PNG, two panels:

- tokens/s against thread count: a line per model, runtime/encoding and test (pp solid, tg dashed),
  or per runtime/encoding and test of one model (--threads-model);
- tokens/s against model size (parameters, or file bytes with --size bytes) at one thread count
  (--threads, default the largest in the data): a line per runtime/encoding and test.

    python -m bitnet_run.bench.plot docs/bench/*.json -o docs/benchmarks.png [--threads N] [--size params|bytes]
        [--threads-model MODEL]

Every point is one row of the input: its avg_ts, with its stddev_ts as an error bar. Nothing is
computed beyond that (lines only join measured points), and two rows for the same point are an
error rather than averaged. Needs matplotlib: pip install 'bitnet-run[plot]'.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

OURS = "bitnet-run"
REQUIRED = ("runtime", "model", "n_threads", "test", "avg_ts", "stddev_ts", "model_n_params", "model_size")
SIZE_FIELDS = {"params": ("model_n_params", "parameters"), "bytes": ("model_size", "file size (bytes)")}
TEST_STYLES = {"pp": "-", "tg": "--"}  # line style by test kind: prompt processing, generation
MARKERS = "osD^v<>ph*"


class PlotError(ValueError):
    """A bad input file or option; the message is one line."""


def load_rows(paths: list[Path]) -> list[dict]:
    """The rows of every file, each tagged with the file it came from (`_source`)."""
    rows = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PlotError(f"{path}: cannot read it as JSON ({' '.join(str(exc).split())})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise PlotError(f"{path}: not the output of `bitnet-run bench -o json` (an array of objects)")
        for i, row in enumerate(data):
            missing = [key for key in REQUIRED if key not in row]
            if missing:
                raise PlotError(f"{path}: row {i} has no {', '.join(missing)} (not a `bitnet-run bench -o json` row)")
            if not _finite(row["avg_ts"]) or not _finite(row["stddev_ts"]):
                raise PlotError(f"{path}: row {i} ({row['model']}, {row['test']}) has a t/s that is not a finite number")
            rows.append({**row, "_source": str(path)})
    if not rows:
        raise PlotError("the input files hold no rows")
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def series(row: dict) -> str:
    """The runtime and weight encoding of a row, e.g. "bitnet-run TL1" or "llama.cpp TQ2_0". Rows
    written before bench had a `weights` field are named by their runtime alone."""
    weights = row.get("weights")
    if not weights or row["runtime"].endswith(weights):
        return row["runtime"]
    return f"{row['runtime']} {weights}"


def check_unique(rows: list[dict]) -> None:
    """Two rows for one point would make a line zigzag (or need an average that was not measured)."""
    seen = {}
    for row in rows:
        key = (row["model"], series(row), row["test"], row["n_threads"])
        if key in seen:
            raise PlotError(f"{key[0]}, {key[1]}, {key[2]}, {key[3]} thread(s) appears twice "
                            f"({seen[key]} and {row['_source']}); give each point once")
        seen[key] = row["_source"]


def _style(row: dict, colors: dict[str, str], marker: str) -> dict:
    """Colour by runtime/encoding, line style by test kind (pp, tg), the marker the caller picks."""
    return {"color": colors[series(row)], "linestyle": TEST_STYLES.get(row["test"][:2], ":"), "marker": marker,
            "capsize": 3}


def _markers(values) -> dict:
    """A marker per distinct value, in first-appearance order."""
    distinct = list(dict.fromkeys(values))
    return {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(distinct)}


def _lines(rows: list[dict], key, x_field: str) -> dict[tuple, list[dict]]:
    """Rows grouped by key(row) into lines, each sorted by x."""
    lines: dict[tuple, list[dict]] = {}
    for row in rows:
        lines.setdefault(key(row), []).append(row)
    return {k: sorted(v, key=lambda r: r[x_field]) for k, v in lines.items()}


def plot_threads(ax, rows: list[dict], colors: dict[str, str]) -> None:
    several_models = len({r["model"] for r in rows}) > 1
    # the marker tells the models apart where there are several, else the tests (e.g. pp128, pp512)
    markers = _markers(r["model"] if several_models else r["test"] for r in rows)
    for (model, name, test), line in _lines(rows, lambda r: (r["model"], series(r), r["test"]), "n_threads").items():
        label = f"{model}, {name} {test}" if several_models else f"{name} {test}"
        marker = markers[model if several_models else test]
        ax.errorbar([r["n_threads"] for r in line], [r["avg_ts"] for r in line], [r["stddev_ts"] for r in line],
                    label=label, **_style(line[0], colors, marker))
    ax.set_xlabel("threads")
    ax.set_xticks(sorted({r["n_threads"] for r in rows}))
    ax.set_ylabel("tokens/s")
    ax.set_title("tokens/s vs threads" + ("" if several_models else f", {rows[0]['model']}"))


def _check_one_per_size(line: list[dict], x_field: str) -> None:
    """Models of one size in one line (e.g. one shape with a bf16 and a q8 head) would stack at one x."""
    for a, b in zip(line, line[1:]):
        if a[x_field] == b[x_field]:
            raise PlotError(f"{a['model']} and {b['model']} ({series(a)} {a['test']}) have the same size; "
                            "plot them from separate files")


def plot_sizes(ax, rows: list[dict], colors: dict[str, str], threads: int, size: str) -> None:
    x_field, x_label = SIZE_FIELDS[size]
    at = [r for r in rows if r["n_threads"] == threads]
    markers = _markers(r["test"] for r in at)
    for (name, test), line in _lines(at, lambda r: (series(r), r["test"]), x_field).items():
        _check_one_per_size(line, x_field)
        ax.errorbar([r[x_field] for r in line], [r["avg_ts"] for r in line], [r["stddev_ts"] for r in line],
                    label=f"{name} {test}", **_style(line[0], colors, markers[test]))
    xs = [r[x_field] for r in at]
    if min(xs) > 0 and max(xs) / min(xs) > 10:  # the shapes span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"tokens/s vs model size, {threads} thread(s)")


def _title(rows: list[dict]) -> str:
    cpus = sorted({str(r.get("cpu")) for r in rows if r.get("cpu")})
    return "bitnet-run bench" + (f": {cpus[0]}" if len(cpus) == 1 else f" ({len(cpus)} CPUs)" if cpus else "")


def plot(rows: list[dict], out: Path, threads: int | None = None, size: str = "params",
         threads_model: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    check_unique(rows)
    available = sorted({r["n_threads"] for r in rows})
    threads = available[-1] if threads is None else threads
    if threads not in available:
        raise PlotError(f"--threads {threads}: no rows at that thread count (the data has {', '.join(map(str, available))})")
    thread_rows = rows
    if threads_model is not None:  # one model's lines only: several models' would crowd the panel
        thread_rows = [r for r in rows if r["model"] == threads_model]
        if not thread_rows:
            models = ", ".join(sorted({r["model"] for r in rows}))
            raise PlotError(f"--threads-model {threads_model!r}: no rows of that model (the data has {models})")
    names = sorted({series(r) for r in rows}, key=lambda n: (not n.startswith(OURS), n))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    plot_threads(left, thread_rows, colors)
    plot_sizes(right, rows, colors, threads, size)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        # below the panel, so that no line is hidden behind it
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle(_title(rows))
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="JSON files written by `bitnet-run bench -o json`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--threads", type=int, help="thread count of the size panel (default: the largest in the data)")
    parser.add_argument("--size", choices=tuple(SIZE_FIELDS), default="params",
                        help="x axis of the size panel: parameters or file bytes (default: params)")
    parser.add_argument("--threads-model", help="plot only this model (e.g. 'synthetic 2b-4t') in the threads panel "
                        "(default: every model)")
    args = parser.parse_args(argv)
    try:
        plot(load_rows(args.inputs), args.output, args.threads, args.size, args.threads_model)
    except (PlotError, OSError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
