"""`bitnet-run bench`: prompt-processing (ppN) and generation (tgN) throughput, llama-bench style.

What is timed is the runtime's evaluation only (Model._eval on token ids): no tokenisation, no
sampling. ppN evaluates N random token ids in one batch from position 0 with an empty cache; tgN
evaluates N tokens one at a time from position 0 (as llama-bench's tg does). Each test runs once
untimed (warm-up: it also pages the mapped weights in), then `repetitions` timed runs; the report is
mean +- sample standard deviation of tokens/s over the repetitions.

Next to the throughput every report has the machine's measured read bandwidth for that thread
count (a C read loop, runtime/src/membw.c) and the decoding ceiling it implies: bandwidth / bytes of
weights read per generated token, since decoding one token reads every weight once.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from . import fileformat as ff

DEFAULT_MEMBW_MIB = 512
MEMBW_REPEATS = 5
TG_WARMUP_TOKENS = 4
OUTPUT_FORMATS = ("md", "json", "csv")

# One row's fields, in output order (json objects, csv columns).
FIELDS = (
    "runtime", "runtime_version", "kernels", "cpu", "model", "model_path", "model_type",
    "model_size", "model_n_params", "linear_bpw", "bytes_per_token", "n_threads", "test",
    "n_prompt", "n_gen", "repetitions", "avg_ts", "stddev_ts", "samples_ts", "membw_gbps",
    "decode_ceiling_ts", "pct_of_ceiling", "peak_rss_mib", "test_time", "ratio_vs",
)


class BenchError(ValueError):
    """A bad benchmark argument; the message is one line."""


# --------------------------------------------------------------------------- argument lists

_RANGE = re.compile(r"^(\d+)-(\d+)(?:([+*])(\d+))?$")


def parse_int_list(text: str, option: str, minimum: int = 0) -> list[int]:
    """llama-bench style integer lists: comma-separated items, each `N`, `A-B` (step 1),
    `A-B+S` (step S) or `A-B*M` (multiply by M), e.g. "1,2", "1-4", "64-512*2", "0-256+64".
    Values keep their order; duplicates are dropped."""
    values: list[int] = []
    items = [item.strip() for item in str(text).split(",")]
    if not items or any(not item for item in items):
        raise BenchError(f"{option}: {text!r} is not a list of integers (e.g. 128,512 or 64-512*2)")
    for item in items:
        if item.isdigit():
            expanded = [int(item)]
        else:
            match = _RANGE.match(item)
            if match is None:
                raise BenchError(f"{option}: {item!r} is not an integer or a range A-B, A-B+S, A-B*M")
            start, stop, op, step = int(match[1]), int(match[2]), match[3] or "+", int(match[4] or 1)
            if stop < start:
                raise BenchError(f"{option}: range {item!r} ends before it starts")
            if (op == "+" and step < 1) or (op == "*" and (step < 2 or start < 1)):
                raise BenchError(f"{option}: range {item!r} would not advance")
            expanded, v = [], start
            while v <= stop:
                expanded.append(v)
                v = v + step if op == "+" else v * step
        for v in expanded:
            if v < minimum:
                raise BenchError(f"{option}: {v} is below the minimum {minimum}")
            if v not in values:
                values.append(v)
    return values


# --------------------------------------------------------------------------- machine facts


def membw_gbps(n_threads: int, nbytes: int = DEFAULT_MEMBW_MIB << 20, repeats: int = MEMBW_REPEATS) -> float:
    """Best read bandwidth (GB/s, 1e9 B/s) of n_threads threads over a buffer of nbytes."""
    from ._bitnet import lib

    gbps = lib.bn_membw_read_gbps(int(nbytes), int(n_threads), int(repeats))
    if gbps == -1.0:
        raise MemoryError(f"the bandwidth probe could not allocate {nbytes >> 20} MiB and {n_threads} threads")
    if gbps < 0:
        raise BenchError(f"the bandwidth probe refused {nbytes} bytes with {n_threads} threads")
    return float(gbps)


def kernels_name() -> str | None:
    """The weight-kernel variant a new context uses (bn_kernels_selected / bn_kernels_name, which
    honour BITNET_RUN_KERNELS), or None when the runtime does not report one."""
    from ._bitnet import ffi, lib

    selected = getattr(lib, "bn_kernels_selected", None)
    name_of = getattr(lib, "bn_kernels_name", None)
    if selected is None or name_of is None:
        return None
    name = name_of(selected())
    return ffi.string(name).decode(errors="replace") if name != ffi.NULL else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class PeakRSS:
    """Peak resident set size over a stretch of code. On Linux the high-water mark is reset first
    (/proc/self/clear_refs 5) so each test gets its own peak; elsewhere it is the process's peak so far."""

    def __init__(self) -> None:
        self.resettable = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def read_mib(self) -> float:
        if self.resettable:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024.0
            except OSError:
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**20 if platform.system() == "Darwin" else 1024.0)


# --------------------------------------------------------------------------- model facts


@dataclass
class ModelFacts:
    label: str
    path: Path
    file_size: int
    n_params: int
    linear_bpw: float | None
    bytes_per_token: int
    model_type: str
    context_length: int


def model_facts(path: Path, label: str) -> ModelFacts:
    """Sizes from the file's tensor table: bits per weight of the ternary linears, and the bytes of
    weights one generated token reads (every tensor once, except an untied embedding, of which only
    the token's row is read; a tied embedding is read whole as the output head). KV cache reads are
    not counted (they are small next to the weights at these context lengths)."""
    header = ff.read_header(path)
    meta = header.metadata
    hidden = int(meta.get("bitnet.hidden_size", 0))
    tied = bool(meta.get("bitnet.tied_embeddings", 1))
    linear_bytes = linear_params = 0
    n_params = per_token = 0
    head = "?"
    for t in header.tensors:
        numel = math.prod(t.dims)
        n_params += numel
        if t.encoding in ff.TERNARY_ENCODINGS:
            linear_bytes += t.nbytes
            linear_params += numel
        if t.name == "model.embed_tokens.weight" and not tied:
            per_token += hidden * ff.FLOAT_ENCODING_DTYPES.get(t.encoding, np.dtype("u1")).itemsize
        else:
            per_token += t.nbytes
        if t.name == ("model.embed_tokens.weight" if tied else "lm_head.weight"):
            head = t.encoding_name
    layers = meta.get("bitnet.n_layers", "?")
    model_type = f"bitnet {hidden}x{layers}L {'tied' if tied else 'untied'} {head} head"
    return ModelFacts(
        label=label, path=path, file_size=header.file_size, n_params=n_params,
        linear_bpw=linear_bytes * 8 / linear_params if linear_params else None,
        bytes_per_token=per_token, model_type=model_type,
        context_length=int(meta.get("bitnet.context_length", 0)),
    )


# --------------------------------------------------------------------------- timing


def _llamacpp_version() -> str | None:
    try:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"
    except Exception:
        return None


def _time_pp(model, tokens: np.ndarray) -> float:
    start = time.perf_counter()
    model._eval(tokens, 0, all_logits=False)
    return time.perf_counter() - start


def _time_tg(model, tokens: np.ndarray) -> float:
    start = time.perf_counter()
    for pos in range(tokens.size):
        model._eval(tokens[pos : pos + 1], pos, all_logits=False)
    return time.perf_counter() - start


@dataclass
class BenchSpec:
    models: list[tuple[str, Path]]  # (label, path)
    n_prompt: list[int]
    n_gen: list[int]
    threads: list[int]
    repetitions: int = 5
    membw_bytes: int = DEFAULT_MEMBW_MIB << 20
    warmup: bool = True
    seed: int = 0
    # model label -> peers run on the same shape: (runtime name, GGUF path, peers.gguf_facts dict)
    peers: dict = field(default_factory=dict)


def validate(spec: BenchSpec, models: bool = True) -> None:
    if models and not spec.models:
        raise BenchError("no model to benchmark (give -m MODEL or --synthetic SHAPE)")
    if spec.repetitions < 1:
        raise BenchError(f"-r: repetitions must be >= 1, got {spec.repetitions}")
    if not spec.threads or min(spec.threads) < 1:
        raise BenchError("-t: thread counts must be >= 1")
    if not any(spec.n_prompt) and not any(spec.n_gen):
        raise BenchError("nothing to run: every -p and -n value is 0")
    if spec.membw_bytes < 1 << 20:
        raise BenchError(f"--membw-mib must be >= 1, got {spec.membw_bytes >> 20}")
    if spec.seed < 0:
        raise BenchError(f"the token seed must be >= 0, got {spec.seed}")


def run(spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict]:
    """Runs the cross product models x threads x (pp tests, tg tests); returns one dict per test."""
    from .model import Model

    validate(spec)
    log = log or (lambda message: None)
    tests = [("pp", n) for n in spec.n_prompt if n > 0] + [("tg", n) for n in spec.n_gen if n > 0]
    n_ctx = max(n for _, n in tests)
    all_facts = {}
    for label, path in spec.models:  # every model checked before anything is timed
        facts = all_facts[label, path] = model_facts(path, label)
        if n_ctx > facts.context_length:
            longest = max(tests, key=lambda test: test[1])
            raise BenchError(
                f"{label}: {longest[0]}{longest[1]} needs {n_ctx} positions but the model's context length "
                f"is {facts.context_length} tokens"
            )
    kernels = kernels_name()
    cpu = f"{cpu_name()} ({os.cpu_count()} CPUs)"
    bandwidth = {}
    for t in spec.threads:
        log(f"read bandwidth, {t} thread(s), {spec.membw_bytes >> 20} MiB buffer")
        bandwidth[t] = membw_gbps(t, spec.membw_bytes)
    rss = PeakRSS()
    rng = np.random.default_rng(spec.seed)
    rows = []
    for label, path in spec.models:
        facts = all_facts[label, path]
        for t in spec.threads:
            model = Model(path, n_threads=t, n_ctx=n_ctx)
            peer_runners = []
            if spec.peers.get(label):
                from .peers import LlamaCppRunner

                n_batch = max([n for kind, n in tests if kind == "pp"] + [1])
                for name, gguf_path, pfacts in spec.peers[label]:
                    log(f"{label}: loading {name} ({gguf_path.name}), {t} thread(s)")
                    peer_runners.append((name, gguf_path, pfacts, LlamaCppRunner(gguf_path, t, n_ctx, n_batch)))
            ceiling = bandwidth[t] * 1e9 / facts.bytes_per_token
            for kind, n in tests:
                name = f"{kind}{n}"
                tokens = rng.integers(0, model.n_vocab, size=n, dtype=np.int32)
                timer = _time_pp if kind == "pp" else _time_tg
                rss.reset()
                if spec.warmup:
                    log(f"{label}: {name}, {t} thread(s), warm-up")
                    timer(model, tokens if kind == "pp" else tokens[:TG_WARMUP_TOKENS])
                    for _, _, _, runner in peer_runners:
                        (runner.time_pp if kind == "pp" else runner.time_tg)(
                            tokens if kind == "pp" else tokens[:TG_WARMUP_TOKENS])
                samples = []
                peer_samples = [[] for _ in peer_runners]
                for rep in range(spec.repetitions):
                    log(f"{label}: {name}, {t} thread(s), run {rep + 1}/{spec.repetitions}")
                    seconds = timer(model, tokens)
                    samples.append(n / seconds if seconds > 0 else float("inf"))
                    for i, (_, _, _, runner) in enumerate(peer_runners):  # interleaved A/B: ours, peer, ours, peer...
                        seconds = (runner.time_pp if kind == "pp" else runner.time_tg)(tokens)
                        peer_samples[i].append(n / seconds if seconds > 0 else float("inf"))
                avg = statistics.fmean(samples)
                std = statistics.stdev(samples) if len(samples) > 1 else 0.0
                peak = rss.read_mib()
                now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                ours = {
                    "runtime": "bitnet-run",
                    "runtime_version": __version__,
                    "kernels": kernels,
                    "cpu": cpu,
                    "model": label,
                    "model_path": str(path),
                    "model_type": facts.model_type,
                    "model_size": facts.file_size,
                    "model_n_params": facts.n_params,
                    "linear_bpw": facts.linear_bpw,
                    "bytes_per_token": facts.bytes_per_token,
                    "n_threads": t,
                    "test": name,
                    "n_prompt": n if kind == "pp" else 0,
                    "n_gen": n if kind == "tg" else 0,
                    "repetitions": spec.repetitions,
                    "avg_ts": avg,
                    "stddev_ts": std,
                    "samples_ts": samples,
                    "membw_gbps": bandwidth[t],
                    "decode_ceiling_ts": ceiling,
                    "pct_of_ceiling": 100.0 * avg / ceiling if kind == "tg" else None,
                    "peak_rss_mib": peak,
                    "test_time": now,
                    "ratio_vs": None,
                }
                rows.append(ours)
                for (pname, gguf_path, pfacts, _), psamples in zip(peer_runners, peer_samples):
                    pavg = statistics.fmean(psamples)
                    pceiling = bandwidth[t] * 1e9 / pfacts["bytes_per_token"]
                    rows.append({
                        **ours,
                        "runtime": pname,
                        "runtime_version": _llamacpp_version(),
                        "kernels": None,
                        "model_path": str(gguf_path),
                        "model_type": pfacts["model_type"],
                        "model_size": gguf_path.stat().st_size,
                        "model_n_params": pfacts["n_params"],
                        "linear_bpw": pfacts["linear_bpw"],
                        "bytes_per_token": pfacts["bytes_per_token"],
                        "avg_ts": pavg,
                        "stddev_ts": statistics.stdev(psamples) if len(psamples) > 1 else 0.0,
                        "samples_ts": psamples,
                        "decode_ceiling_ts": pceiling,
                        "pct_of_ceiling": 100.0 * pavg / pceiling if kind == "tg" else None,
                        "ratio_vs": avg / pavg if pavg > 0 else None,
                    })
            for runner in peer_runners:
                runner[3].close()
            del model, peer_runners
            gc.collect()  # unmap this model before the next one is measured
    return rows


# --------------------------------------------------------------------------- output


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


MD_COLUMNS = ("model", "size", "params", "bpw", "threads", "test", "t/s", "read GB/s", "ceiling t/s",
              "% of ceiling", "peak RSS")
_MD_RIGHT = {"size", "params", "bpw", "threads", "test", "t/s", "read GB/s", "ceiling t/s", "% of ceiling", "peak RSS"}


def format_md(rows: Sequence[dict]) -> str:
    with_peers = any(r["runtime"] != "bitnet-run" for r in rows)
    columns = (("runtime",) + MD_COLUMNS + ("ours/peer",)) if with_peers else MD_COLUMNS
    right = _MD_RIGHT | {"ours/peer"}
    cells = []
    for r in rows:
        tg = r["n_gen"] > 0
        extra_first = [r["runtime"]] if with_peers else []
        extra_last = [f"{r['ratio_vs']:.2f}" if r.get("ratio_vs") is not None else ""] if with_peers else []
        cells.append(extra_first + [
            r["model"], _size(r["model_size"]), _count(r["model_n_params"]), f"{r['linear_bpw']:.2f}" if r["linear_bpw"] is not None else "-",
            str(r["n_threads"]), r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
            f"{r['membw_gbps']:.1f}", f"{r['decode_ceiling_ts']:.1f}" if tg else "",
            f"{r['pct_of_ceiling']:.1f}%" if tg else "", f"{r['peak_rss_mib']:.0f} MiB",
        ] + extra_last)
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "| " + " | ".join(
            v.rjust(w) if columns[i] in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
        ) + " |"

    rule = "| " + " | ".join(
        ("-" * (w - 1) + ":") if columns[i] in right else "-" * w for i, w in enumerate(widths)
    ) + " |"
    out = [line(columns), rule] + [line(c) for c in cells]
    if rows:
        first = rows[0]
        out.append("")
        out.append(
            f"bitnet-run {first['runtime_version']}, kernels: {first['kernels'] or 'not reported by the runtime'}, "
            f"CPU: {first['cpu']}."
        )
        per_model = {}
        for r in rows:
            key = r["model"] if r["runtime"] == "bitnet-run" else f"{r['model']} {r['runtime']}"
            per_model.setdefault(key, r["bytes_per_token"])
        reads = "; ".join(f"{m} {b / 2**20:.0f} MiB" for m, b in per_model.items())
        out.append(
            "ceiling = read bandwidth of that many threads / weight bytes read per generated token "
            f"({reads}); t/s is mean ± stddev over {first['repetitions']} runs."
        )
        if with_peers:
            versions = sorted({r["runtime_version"] or "?" for r in rows if r["runtime"] != "bitnet-run"})
            out.append(
                f"Peers ({', '.join(versions)}) ran interleaved with bitnet-run, run by run, on the same random "
                "token ids; ours/peer = bitnet-run t/s / that row's t/s. peak RSS is the whole process."
            )
    return "\n".join(out) + "\n"


def format_json(rows: Sequence[dict]) -> str:
    return json.dumps([{k: r[k] for k in FIELDS} for r in rows], indent=2) + "\n"


def format_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for r in rows:
        values = []
        for k in FIELDS:
            v = r[k]
            if k == "samples_ts":
                v = ";".join(repr(float(x)) for x in v)
            elif v is None:
                v = ""
            values.append(v)
        writer.writerow(values)
    return buf.getvalue()


def format_rows(rows: Sequence[dict], output: str) -> str:
    if output == "md":
        return format_md(rows)
    if output == "json":
        return format_json(rows)
    if output == "csv":
        return format_csv(rows)
    raise BenchError(f"-o: unknown output format {output!r} (expected md, json or csv)")


# --------------------------------------------------------------------------- peers

PEERS = ("none", "llamacpp")


def check_peers(peers: str) -> list[str]:
    """The peers to run ("none" -> []); "llamacpp" needs llama-cpp-python and gguf importable. A
    missing or broken install is a one-line BenchError, never a report without the peer."""
    out = []
    for peer in [p.strip() for p in peers.split(",") if p.strip()] or ["none"]:
        if peer == "none":
            continue
        if peer != "llamacpp":
            raise BenchError(f"--peers: unknown peer {peer!r} (expected one of: {', '.join(PEERS)})")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise BenchError("llama-cpp-python is not installed: pip install 'bitnet-run[peers]'") from None
        except Exception as exc:  # installed, but its shared library does not load
            detail = " ".join(str(exc).split())
            raise BenchError(f"llama-cpp-python is installed but cannot be imported: {detail}") from None
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise BenchError("gguf is not installed: pip install 'bitnet-run[peers]'") from None
        if peer not in out:
            out.append(peer)
    return out


# --------------------------------------------------------------------------- kernel micro-benchmarks

KERNEL_FIELDS = ("model", "name", "rows", "cols", "n_tok", "variant", "threads", "encoding", "seconds",
                 "best_seconds", "weight_gbps", "gmacs", "speedup")


def linear_shapes(path: Path) -> dict[str, list[tuple[str, int, int]]]:
    """The distinct ternary matrix shapes of a model file by encoding name ("i2", "tl1", "tl2"),
    each named after the first tensor of that shape."""
    shapes: dict[tuple[int, tuple[int, ...]], str] = {}
    for t in ff.read_header(path).tensors:
        if t.encoding in ff.TERNARY_ENCODINGS and (t.encoding, tuple(t.dims)) not in shapes:
            shapes[t.encoding, tuple(t.dims)] = t.name.rsplit(".", 2)[-2]
    by_encoding: dict[str, list[tuple[str, int, int]]] = {}
    for (encoding, (rows, cols)), name in shapes.items():
        by_encoding.setdefault(ff.ENCODING_NAMES[encoding].lower(), []).append((name, rows, cols))
    return by_encoding


def run_kernels(spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict]:
    """`bench --kernels`: every kernel variant on each model's ternary matrix shapes, at one token
    (decoding) and at each -p length, weights cycled through a buffer of --membw-mib so they come
    from memory; median seconds per call over -r calls (bitnet_run.kernel_bench)."""
    try:
        from .kernel_bench import time_kernels
    except ImportError as exc:
        raise BenchError(f"--kernels: this build has no kernel benchmark ({exc})") from None
    validate(spec)
    log = log or (lambda message: None)
    n_toks = tuple(dict.fromkeys([1] + [n for n in spec.n_prompt if n > 0]))
    rows = []
    for label, path in spec.models:
        for encoding, shapes in linear_shapes(path).items():
            for t in spec.threads:
                log(f"{label}: {encoding} kernels on {len(shapes)} shapes, {t} thread(s)")
                for r in time_kernels(shapes, threads=t, repeats=spec.repetitions, n_toks=n_toks,
                                      encoding=encoding, cold_bytes=spec.membw_bytes):
                    rows.append({"model": label, **{k: r[k] for k in KERNEL_FIELDS if k != "model"}})
    return rows


def format_kernel_rows(rows: Sequence[dict], output: str) -> str:
    if output == "json":
        return json.dumps(list(rows), indent=2) + "\n"
    if output == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, KERNEL_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    head = ("model", "shape", "rows", "cols", "n_tok", "encoding", "kernel", "threads", "ms/call", "GB/s", "GMAC/s", "x ref")
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['name']} | {r['rows']} | {r['cols']} | {r['n_tok']} | {r['encoding']} | {r['variant']} | {r['threads']} "
            f"| {r['seconds'] * 1e3:.3f} | {r['weight_gbps']:.2f} | {r['gmacs']:.2f} | {r['speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"
