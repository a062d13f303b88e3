"""`bitnet-run bench`: prompt-processing (ppN) and generation (tgN) throughput, llama-bench style.

ppN and tgN time the runtime's evaluation only (Model._eval on token ids): no tokenisation, no
sampling. ppN evaluates N random token ids in one batch from position 0 with an empty cache; tgN
evaluates N tokens one at a time from position 0 (as llama-bench's tg does). Two more kinds of
ours only (peers have no rows for them):
These run inside each tgN test, interleaved with it (and each other) run by run:
- e2eN (`--e2e`): end-to-end generation, what an application sees: Model.stream_generate from a
  one-token prompt to N tokens with the default sampling parameters (stop tokens ignored), timed
  whole: the same N evaluations as tgN plus sampling, detokenization and the Python loop.
- tgN xS (`--parallel S,...`): S sequences decoded together, N steps of one batch of S tokens (one
  per sequence, bn_decode, with the logits of all S), from position 0; t/s is the aggregate S*N /
  seconds.
Each test runs once
untimed (warm-up: it also pages the mapped weights in), then `repetitions` timed runs; the report is
mean +- sample standard deviation of tokens/s over the repetitions.

Next to the throughput every report has the machine's measured read bandwidth for that thread
count (a C read loop, runtime/src/membw.c) and the decoding ceiling it implies: bandwidth / bytes of
weights read per generated token, since decoding one token reads every weight once.

Models that share a label (one synthetic shape in several ternary encodings, `--weights`) form one
group: they and the group's peers (`--peers`) run interleaved, run by run, on the same token ids.
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

from .. import __version__
from .. import fileformat as ff

DEFAULT_MEMBW_MIB = 512
MEMBW_REPEATS = 5
TG_WARMUP_TOKENS = 4
OUTPUT_FORMATS = ("md", "json", "csv")
OURS = "bitnet-run"  # the `runtime` of our rows

# Per ternary encoding of ours (i2, tl1, tl2): the field of a peer row holding our t/s in that
# encoding / the peer's t/s.
RATIO_FIELDS = {name: f"ratio_vs_{name}" for name in ff.WEIGHT_ENCODINGS}

# One row's fields, in output order (json objects, csv columns). Fields added later go at the end,
# so that the existing csv columns keep their positions.
FIELDS = (
    "runtime", "runtime_version", "kernels", "cpu", "model", "model_path", "model_type",
    "model_size", "model_n_params", "linear_bpw", "bytes_per_token", "n_threads", "test",
    "n_prompt", "n_gen", "repetitions", "avg_ts", "stddev_ts", "samples_ts", "membw_gbps",
    "decode_ceiling_ts", "pct_of_ceiling", "peak_rss_mib", "test_time", "ratio_vs",
    "weights", *RATIO_FIELDS.values(), "n_parallel",
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


def parse_weights(text: str) -> list[str]:
    """--weights: a comma list of ternary encodings of the synthetic models (i2, tl1, tl2), in the
    order given, duplicates dropped."""
    known = tuple(ff.WEIGHT_ENCODINGS)
    names = [item.strip() for item in str(text).split(",")]
    for name in names:
        if name not in known:
            raise BenchError(f"--weights: unknown encoding {name!r} (expected a comma list of {', '.join(known)})")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- machine facts


def membw_gbps(n_threads: int, nbytes: int = DEFAULT_MEMBW_MIB << 20, repeats: int = MEMBW_REPEATS) -> float:
    """Best read bandwidth (GB/s, 1e9 B/s) of n_threads threads over a buffer of nbytes."""
    from .._bitnet import lib

    gbps = lib.bn_membw_read_gbps(int(nbytes), int(n_threads), int(repeats))
    if gbps == -1.0:
        raise MemoryError(f"the bandwidth probe could not allocate {nbytes >> 20} MiB and {n_threads} threads")
    if gbps < 0:
        raise BenchError(f"the bandwidth probe refused {nbytes} bytes with {n_threads} threads")
    return float(gbps)


def kernels_name() -> str | None:
    """The weight-kernel variant a new context uses (bn_kernels_selected / bn_kernels_name, which
    honour BITNET_RUN_KERNELS), or None when the runtime does not report one."""
    from .._bitnet import ffi, lib

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
    weights: str | None  # the ternary encoding of the linears ("I2", "TL1", "TL2"; "I2+TL1" if mixed)


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
    linear_encodings = []
    for t in header.tensors:
        numel = math.prod(t.dims)
        n_params += numel
        if t.encoding in ff.TERNARY_ENCODINGS:
            linear_bytes += t.nbytes
            linear_params += numel
            if t.encoding_name not in linear_encodings:
                linear_encodings.append(t.encoding_name)
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
        weights="+".join(linear_encodings) or None,
    )


# --------------------------------------------------------------------------- timing


def _llamacpp_version() -> str | None:
    try:
        from .peers import import_llama_cpp

        return f"llama-cpp-python {import_llama_cpp().__version__}"
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


def _time_e2e(model, tokens: np.ndarray) -> float:
    """tokens.size generated tokens from the one-token prompt tokens[:1], default sampling, seeded."""
    model.reset()
    start = time.perf_counter()
    for _ in model.stream_generate(tokens[:1].tolist(), max_tokens=int(tokens.size), seed=0, stop_ids=()):
        pass
    return time.perf_counter() - start


def _time_parallel(context, tokens: np.ndarray, n_seq: int, n_vocab: int) -> float:
    """tokens.size steps, each one bn_decode batch of n_seq tokens (sequence s gets tokens + s) with
    the logits of every sequence, as a server decoding n_seq streams needs them."""
    for seq in range(n_seq):
        context.clear(seq)
    seq_ids = list(range(n_seq))
    want = [True] * n_seq
    start = time.perf_counter()
    for pos in range(tokens.size):
        batch = [(int(tokens[pos]) + seq) % n_vocab for seq in seq_ids]
        context.decode(batch, seq_ids, [pos] * n_seq, want_logits=want)
    return time.perf_counter() - start


class _ModelRunner:
    """bitnet-run's Model at one thread count, behind the timer interface of peers.LlamaCppRunner
    (time_pp, time_tg, n_vocab, close), so that ours and the peers are timed by the same loop; plus
    time_e2e and time_parallel, which only ours has. n_seq: sequence slots of the batched-decoding
    context (made on first use)."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int, n_seq: int = 1):
        from ..model import Model

        self.model = Model(path, n_threads=n_threads, n_ctx=n_ctx)
        self.n_vocab = self.model.n_vocab
        self.n_seq = n_seq
        self._batched = None

    def time_pp(self, tokens: np.ndarray) -> float:
        return _time_pp(self.model, tokens)

    def time_tg(self, tokens: np.ndarray) -> float:
        return _time_tg(self.model, tokens)

    def time_e2e(self, tokens: np.ndarray) -> float:
        return _time_e2e(self.model, tokens)

    def time_parallel(self, tokens: np.ndarray, n_seq: int) -> float:
        if self._batched is None:
            from ..context import Context

            self._batched = Context(self.model, n_ctx=self.model.n_ctx, n_seq=self.n_seq,
                                    n_threads=self.model.n_threads, kv_type=self.model.kv_type)
        return _time_parallel(self._batched, tokens, n_seq, self.n_vocab)

    def close(self) -> None:
        if self._batched is not None:
            self._batched.close()
            self._batched = None
        self.model = None  # the weights are unmapped once the last reference goes


@dataclass
class BenchSpec:
    models: list[tuple[str, Path]]  # (label, path); models with the same label are one group
    n_prompt: list[int]
    n_gen: list[int]
    threads: list[int]
    repetitions: int = 5
    membw_bytes: int = DEFAULT_MEMBW_MIB << 20
    warmup: bool = True
    seed: int = 0
    e2e: bool = False  # e2eN rows next to each tgN
    parallel: list[int] = field(default_factory=list)  # tgN xS rows for each S
    # model label -> peers run on the same shape: (runtime name, GGUF path, peers.gguf_facts dict);
    # a "llama_bench" entry in the facts (a path) times that peer with its own llama-bench binary
    # (peers.LlamaBenchRunner), else it runs in process through llama-cpp-python
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
    if (spec.e2e or spec.parallel) and not any(spec.n_gen):
        raise BenchError("--e2e and --parallel time generation: give a -n value above 0")
    if spec.parallel and min(spec.parallel) < 1:
        raise BenchError("--parallel: sequence counts must be >= 1")
    if spec.membw_bytes < 1 << 20:
        raise BenchError(f"--membw-mib must be >= 1, got {spec.membw_bytes >> 20}")
    if spec.seed < 0:
        raise BenchError(f"the token seed must be >= 0, got {spec.seed}")


@dataclass
class _Contender:
    """One runtime on one file in a group: the row fields that do not depend on the test, and the
    runner that times it (_ModelRunner, peers.LlamaCppRunner or, given a llama-bench binary,
    peers.LlamaBenchRunner), opened for one thread count."""

    fields: dict
    llama_bench: Path | None = None
    runner: object = None


def _our_fields(facts: ModelFacts, kernels: str | None, cpu: str) -> dict:
    return {
        "runtime": OURS, "runtime_version": __version__, "kernels": kernels, "cpu": cpu,
        "model": facts.label, "model_path": str(facts.path), "model_type": facts.model_type,
        "model_size": facts.file_size, "model_n_params": facts.n_params, "linear_bpw": facts.linear_bpw,
        "bytes_per_token": facts.bytes_per_token, "weights": facts.weights,
    }


def _peer_fields(label: str, name: str, gguf_path: Path, pfacts: dict, cpu: str) -> dict:
    # a llama-bench peer's version (its build) is known once it has run: run() fills it in
    version = None if pfacts.get("llama_bench") is not None else _llamacpp_version()
    return {
        "runtime": name, "runtime_version": version, "kernels": None, "cpu": cpu,
        "model": label, "model_path": str(gguf_path), "model_type": pfacts["model_type"],
        "model_size": gguf_path.stat().st_size, "model_n_params": pfacts["n_params"],
        "linear_bpw": pfacts["linear_bpw"], "bytes_per_token": pfacts["bytes_per_token"],
        "weights": pfacts.get("weights"),
    }


def _groups(spec: BenchSpec, all_facts: dict, kernels: str | None, cpu: str) -> list[list[_Contender]]:
    """The models grouped by label (in first-appearance order), each group followed by its peers."""
    groups: dict[str, list[_Contender]] = {}
    for label, path in spec.models:
        groups.setdefault(label, []).append(_Contender(_our_fields(all_facts[label, path], kernels, cpu)))
    for label, group in groups.items():
        for name, gguf_path, pfacts in spec.peers.get(label) or []:
            binary = pfacts.get("llama_bench")
            group.append(_Contender(_peer_fields(label, name, gguf_path, pfacts, cpu),
                                    Path(binary) if binary is not None else None))
    return list(groups.values())


def _open(group: list[_Contender], n_threads: int, n_ctx: int, n_batch: int, n_seq: int,
          log: Callable[[str], None]) -> None:
    """Load every contender of the group at n_threads (all stay loaded: their runs interleave)."""
    try:
        for c in group:
            if c.fields["runtime"] == OURS:
                c.runner = _ModelRunner(Path(c.fields["model_path"]), n_threads, n_ctx, n_seq)
            elif c.llama_bench is not None:
                from .peers import LlamaBenchRunner

                c.runner = LlamaBenchRunner(c.llama_bench, c.fields["model_path"], n_threads)
            else:
                from .peers import LlamaCppRunner

                log(f"{c.fields['model']}: loading {c.fields['runtime']} ({Path(c.fields['model_path']).name}), "
                    f"{n_threads} thread(s)")
                c.runner = LlamaCppRunner(c.fields["model_path"], n_threads, n_ctx, n_batch)
    except BaseException:
        _close(group)
        raise


def _close(group: list[_Contender]) -> None:
    for c in group:
        if c.runner is not None:
            c.runner.close()
            c.runner = None
    gc.collect()  # unmap these models before the next ones are measured


def _timer(runner, kind: str, n_seq: int) -> Callable[[np.ndarray], float]:
    """The runner's timer for a test kind: pp, tg, e2e or par (n_seq sequences; e2e and par: ours only)."""
    if kind == "par":
        return lambda tokens: runner.time_parallel(tokens, n_seq)
    return getattr(runner, f"time_{kind}")


def _measure(timers: list[Callable[[np.ndarray], float]], kind: str, tokens: np.ndarray, spec: BenchSpec,
             log: Callable[[str], None], what: str, n_seqs: list[int]) -> list[list[float]]:
    """Tokens/s samples of every timer on the same tokens: the warm-ups of all first, then the timed
    runs interleaved run by run (A, B, C, A, B, C, ...), so that a drift of the machine hits every
    contender alike. A timer of n_seqs[i] sequences counts that many tokens per token of `tokens`."""
    if spec.warmup:
        log(f"{what}, warm-up")
        for timer in timers:
            timer(tokens if kind == "pp" else tokens[:TG_WARMUP_TOKENS])
    samples: list[list[float]] = [[] for _ in timers]
    for rep in range(spec.repetitions):
        log(f"{what}, run {rep + 1}/{spec.repetitions}")
        for timer, out, n_seq in zip(timers, samples, n_seqs):
            seconds = timer(tokens)
            out.append(n_seq * tokens.size / seconds if seconds > 0 else float("inf"))
    return samples


def _test_name(kind: str, n: int, n_seq: int) -> str:
    return f"tg{n} x{n_seq}" if kind == "par" else f"{kind}{n}"


def _row(fields: dict, samples: list[float], kind: str, n: int, n_threads: int, gbps: float,
         repetitions: int, peak_mib: float, now: str, n_seq: int = 1) -> dict:
    """One result row. The ceiling of n_seq sequences decoded together is n_seq times one sequence's:
    a step reads the weights once for all of them."""
    avg = statistics.fmean(samples)
    ceiling = n_seq * gbps * 1e9 / fields["bytes_per_token"]
    return {
        **fields,
        "n_threads": n_threads,
        "test": _test_name(kind, n, n_seq),
        "n_prompt": n if kind == "pp" else 0,
        "n_gen": n if kind != "pp" else 0,
        "repetitions": repetitions,
        "avg_ts": avg,
        "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "samples_ts": samples,
        "membw_gbps": gbps,
        "decode_ceiling_ts": ceiling,
        "pct_of_ceiling": 100.0 * avg / ceiling if kind != "pp" else None,
        "peak_rss_mib": peak_mib,
        "test_time": now,
        "ratio_vs": None,
        **dict.fromkeys(RATIO_FIELDS.values()),
        "n_parallel": n_seq if kind == "par" else None,
    }


def _add_ratios(rows: Sequence[dict]) -> None:
    """Fills the ratios of the peer rows of one test: ratio_vs = t/s of our first row (the first
    --weights encoding) / the peer's, ratio_vs_<encoding> = t/s of our row in that encoding / the peer's."""
    ours = [r for r in rows if r["runtime"] == OURS]
    for r in rows:
        if r["runtime"] == OURS or not ours or r["avg_ts"] <= 0:
            continue
        r["ratio_vs"] = ours[0]["avg_ts"] / r["avg_ts"]
        for o in ours:
            key = RATIO_FIELDS.get((o["weights"] or "").lower())
            if key is not None:
                r[key] = o["avg_ts"] / r["avg_ts"]


def _bandwidth_by_threads(spec: BenchSpec, log: Callable[[str], None]) -> dict[int, float]:
    """The read probe (GB/s) once per thread count of the run, before anything is timed."""
    bandwidth = {}
    for t in spec.threads:
        log(f"read bandwidth, {t} thread(s), {spec.membw_bytes >> 20} MiB buffer")
        bandwidth[t] = membw_gbps(t, spec.membw_bytes)
    return bandwidth


def run(spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict]:
    """Runs the cross product models x threads x (pp tests, tg tests); returns one dict per test and
    model (and peer). The models of one group (same label) and its peers run interleaved."""
    validate(spec)
    log = log or (lambda message: None)
    tests = [("pp", n) for n in spec.n_prompt if n > 0] + [("tg", n) for n in spec.n_gen if n > 0]
    # the generation variants of ours run inside each tg test, interleaved with it run by run
    variants = [("e2e", 1)] * spec.e2e + [("par", s) for s in spec.parallel]
    n_ctx = max(n for _, n in tests)
    n_batch = max([n for kind, n in tests if kind == "pp"] + [1])
    n_seq = max(spec.parallel, default=1)
    all_facts = {}
    for label, path in spec.models:  # every model checked before anything is timed
        facts = all_facts[label, path] = model_facts(path, label)
        if n_ctx > facts.context_length:
            longest = max(tests, key=lambda test: test[1])
            raise BenchError(
                f"{label}: {longest[0]}{longest[1]} needs {n_ctx} positions but the model's context length "
                f"is {facts.context_length} tokens"
            )
    cpu = f"{cpu_name()} ({os.cpu_count()} CPUs)"
    groups = _groups(spec, all_facts, kernels_name(), cpu)
    bandwidth = _bandwidth_by_threads(spec, log)
    rss = PeakRSS()
    rng = np.random.default_rng(spec.seed)
    rows = []
    for group in groups:
        label = group[0].fields["model"]
        for t in spec.threads:
            _open(group, t, n_ctx, n_batch, n_seq, log)
            try:
                n_vocab = min(c.runner.n_vocab for c in group)
                for kind, n in tests:
                    tokens = rng.integers(0, n_vocab, size=n, dtype=np.int32)
                    timed = [(c, kind, 1) for c in group]
                    if kind == "tg":
                        timed += [(c, k, s) for k, s in variants for c in group if c.fields["runtime"] == OURS]
                    rss.reset()
                    samples = _measure([_timer(c.runner, k, s) for c, k, s in timed], kind, tokens, spec, log,
                                       f"{label}: {kind}{n}, {t} thread(s)", [s for _, _, s in timed])
                    for c in group:
                        if c.llama_bench is not None:
                            c.fields["runtime_version"] = c.runner.version
                    peak, now = rss.read_mib(), _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                    test_rows = [_row(c.fields, x, k, n, t, bandwidth[t], spec.repetitions, peak, now, s)
                                 for (c, k, s), x in zip(timed, samples)]
                    _add_ratios(test_rows)
                    rows += test_rows
            finally:
                _close(group)
    return rows


# --------------------------------------------------------------------------- output


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


MD_COLUMNS = ("model", "weights", "size", "params", "bpw", "threads", "test", "t/s", "read GB/s", "ceiling t/s",
              "% of ceiling", "peak RSS")
_MD_RIGHT = {"size", "params", "bpw", "threads", "test", "t/s", "read GB/s", "ceiling t/s", "% of ceiling", "peak RSS"}


def ratio_columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(md column, row field) of the ours/peer ratios: one `ours/peer` column (ratio_vs) when ours
    ran in one encoding, else a `<ENCODING>/peer` column (ratio_vs_<encoding>) per encoding of ours."""
    ours = list(dict.fromkeys(r.get("weights") for r in rows if r["runtime"] == OURS))
    per_encoding = [(f"{w}/peer", RATIO_FIELDS[w.lower()]) for w in ours if w and w.lower() in RATIO_FIELDS]
    return per_encoding if len(ours) > 1 and len(per_encoding) == len(ours) else [("ours/peer", "ratio_vs")]


def _md_cells(r: dict, with_peers: bool, ratios: list[tuple[str, str]]) -> list[str]:
    tg = r["n_gen"] > 0
    first = [r["runtime"]] if with_peers else []
    last = [f"{r[key]:.2f}" if r.get(key) is not None else "" for _, key in ratios] if with_peers else []
    return first + [
        r["model"], r.get("weights") or "-", _size(r["model_size"]), _count(r["model_n_params"]),
        f"{r['linear_bpw']:.2f}" if r["linear_bpw"] is not None else "-",
        str(r["n_threads"]), r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
        f"{r['membw_gbps']:.1f}", f"{r['decode_ceiling_ts']:.1f}" if tg else "",
        f"{r['pct_of_ceiling']:.1f}%" if tg else "", f"{r['peak_rss_mib']:.0f} MiB",
    ] + last


def _md_notes(rows: Sequence[dict], with_peers: bool, ratios: list[tuple[str, str]]) -> list[str]:
    first = rows[0]
    notes = [
        f"bitnet-run {first['runtime_version']}, kernels: {first['kernels'] or 'not reported by the runtime'}, "
        f"CPU: {first['cpu']}."
    ]
    per_model = {}
    for r in rows:
        key = f"{r['model']} {r.get('weights') or ''}".rstrip() if r["runtime"] == OURS else f"{r['model']} {r['runtime']}"
        per_model.setdefault(key, r["bytes_per_token"])
    reads = "; ".join(f"{m} {b / 2**20:.0f} MiB" for m, b in per_model.items())
    notes.append(
        "ceiling = read bandwidth of that many threads / weight bytes read per generated token "
        f"({reads}); t/s is mean ± stddev over {first['repetitions']} runs."
    )
    if any(r["test"].startswith("e2e") for r in rows):
        notes.append("e2eN: Model.stream_generate of N tokens from a one-token prompt, default sampling, "
                     "timed whole (sampling, detokenization and Python included).")
    if any(r.get("n_parallel") for r in rows):
        notes.append("tgN xS: S sequences decoded together in batches of S tokens; t/s and ceiling are the "
                     "aggregate of all S.")
    if with_peers:
        versions = sorted({r["runtime_version"] or "?" for r in rows if r["runtime"] != OURS})
        ratio_text = ("ours/peer = bitnet-run t/s / that row's t/s" if ratios == [("ours/peer", "ratio_vs")]
                      else "X/peer = bitnet-run t/s with X weights / that row's t/s")
        own_bench = any((r["runtime_version"] or "").startswith("llama-bench ") for r in rows if r["runtime"] != OURS)
        notes.append(
            f"Peers ({', '.join(versions)}) ran interleaved with bitnet-run, run by run, on the same random "
            f"token ids{' (a peer run by its own llama-bench: one process per run, the same token counts, its own random ids)' if own_bench else ''}; "
            f"{ratio_text}. peak RSS is the whole process{'' if not own_bench else ' (llama-bench peers: ours only)'}."
        )
    return notes


def format_md(rows: Sequence[dict]) -> str:
    with_peers = any(r["runtime"] != OURS for r in rows)
    ratios = ratio_columns(rows)
    columns = ("runtime",) + MD_COLUMNS + tuple(name for name, _ in ratios) if with_peers else MD_COLUMNS
    right = _MD_RIGHT | {name for name, _ in ratios}
    cells = [_md_cells(r, with_peers, ratios) for r in rows]
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
        out += [""] + _md_notes(rows, with_peers, ratios)
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

PEERS = ("none", "llamacpp", "bitnetcpp", "ikllama")
# The peers that run only through their own llama-bench (they are not on PyPI: built from source).
BINARY_PEERS = {"bitnetcpp": "bitnet.cpp", "ikllama": "ik_llama.cpp"}


def parse_peer_bins(items: Sequence[str]) -> dict[str, Path]:
    """--peer-bin NAME=PATH items (repeatable): a peer's own llama-bench binary by peer name. ikllama's
    also needs the llama-quantize next to it (it makes the IQ2_BN files)."""
    bins: dict[str, Path] = {}
    for item in items:
        name, sep, path_text = str(item).partition("=")
        name = name.strip()
        if not sep or not name or not path_text.strip():
            raise BenchError(f"--peer-bin: expected NAME=PATH (e.g. bitnetcpp=/path/to/llama-bench), got {item!r}")
        if name not in PEERS or name == "none":
            raise BenchError(f"--peer-bin: unknown peer {name!r} (expected one of: {', '.join(PEERS[1:])})")
        path = Path(path_text.strip()).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise BenchError(f"--peer-bin {name}: {path} is not an executable file")
        if name == "ikllama" and not os.access(path.parent / "llama-quantize", os.X_OK):
            raise BenchError(f"--peer-bin ikllama: no executable llama-quantize next to {path} "
                             "(ik_llama.cpp's own llama-quantize makes its IQ2_BN files)")
        if name in bins and bins[name] != path:
            raise BenchError(f"--peer-bin: {name} given twice ({bins[name]} and {path})")
        bins[name] = path
    return bins


def check_peers(peers: str, peer_bins: dict[str, Path] | None = None) -> list[str]:
    """The peers to run ("none" -> []). A peer with a --peer-bin runs through that llama-bench;
    bitnetcpp and ikllama need one; llamacpp without one needs llama-cpp-python; all need gguf. A
    missing or broken install is a one-line BenchError, never a report without the peer."""
    peer_bins = peer_bins or {}
    out = []
    names = [p.strip() for p in peers.split(",") if p.strip()] or ["none"]
    for name in peer_bins:
        if name not in names:
            raise BenchError(f"--peer-bin {name}: {name} is not in --peers {peers}")
    for peer in names:
        if peer == "none":
            continue
        if peer not in PEERS:
            raise BenchError(f"--peers: unknown peer {peer!r} (expected one of: {', '.join(PEERS)})")
        if peer in BINARY_PEERS and peer not in peer_bins:
            raise BenchError(f"--peers {peer} needs --peer-bin {peer}=PATH of {BINARY_PEERS[peer]}'s own llama-bench "
                             f"({BINARY_PEERS[peer]} is not on PyPI: build it from source)")
        if peer not in peer_bins:
            _check_llama_cpp_python()
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise BenchError("gguf is not installed: pip install 'bitnet-run[peers]'") from None
        if peer not in out:
            out.append(peer)
    return out


def _check_llama_cpp_python() -> None:
    try:
        from .peers import import_llama_cpp

        import_llama_cpp()
    except ImportError:
        raise BenchError("llama-cpp-python is not installed: pip install 'bitnet-run[peers]'") from None
    except Exception as exc:  # installed, but its shared library does not load
        detail = " ".join(str(exc).split())
        raise BenchError(f"llama-cpp-python is installed but cannot be imported: {detail}") from None


# --------------------------------------------------------------------------- kernel micro-benchmarks

KERNEL_FIELDS = ("model", "name", "rows", "cols", "n_tok", "variant", "threads", "encoding", "seconds",
                 "best_seconds", "weight_gbps", "gmacs", "speedup", "membw_gbps", "pct_of_membw")


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
    from memory; median seconds per call over -r calls (bitnet_run.bench.kernels)."""
    try:
        from .kernels import time_kernels
    except ImportError as exc:
        raise BenchError(f"--kernels: this build has no kernel benchmark ({exc})") from None
    validate(spec)
    log = log or (lambda message: None)
    n_toks = tuple(dict.fromkeys([1] + [n for n in spec.n_prompt if n > 0]))
    bandwidth = _bandwidth_by_threads(spec, log)
    rows = []
    for label, path in spec.models:
        for encoding, shapes in linear_shapes(path).items():
            for t in spec.threads:
                log(f"{label}: {encoding} kernels on {len(shapes)} shapes, {t} thread(s)")
                gbps = bandwidth[t]
                for r in time_kernels(shapes, threads=t, repeats=spec.repetitions, n_toks=n_toks,
                                      encoding=encoding, cold_bytes=spec.membw_bytes):
                    pct = 100.0 * r["weight_gbps"] / gbps if gbps > 0 else None
                    r = {**r, "membw_gbps": gbps, "pct_of_membw": pct}
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
    head = ("model", "shape", "rows", "cols", "n_tok", "encoding", "kernel", "threads", "ms/call", "GB/s", "GMAC/s", "x ref",
            "read GB/s", "% of read")
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        pct = "" if r["pct_of_membw"] is None else f"{r['pct_of_membw']:.0f}%"
        lines.append(
            f"| {r['model']} | {r['name']} | {r['rows']} | {r['cols']} | {r['n_tok']} | {r['encoding']} | {r['variant']} | {r['threads']} "
            f"| {r['seconds'] * 1e3:.3f} | {r['weight_gbps']:.2f} | {r['gmacs']:.2f} | {r['speedup']:.2f} "
            f"| {r['membw_gbps']:.1f} | {pct} |"
        )
    return "\n".join(lines) + "\n"
