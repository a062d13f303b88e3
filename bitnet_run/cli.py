"""The `bitnet-run` command line: convert, pull, list, rm, run (generate), chat, perplexity, show, bench.

Flags follow llama.cpp (-m -p -f -n -t -c --temp --top-k --top-p --min-p --repeat-penalty --seed);
generated text goes to stdout, timings and progress to stderr.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import BitNetError
from .paths import default_model

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run ternary (BitNet b1.58) models on the CPU.")
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _version_callback(value: bool):
    if value:
        typer.echo(f"bitnet-run {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
):
    pass


# ---- shared options -------------------------------------------------------------------------------
ModelOpt = typer.Option(None, "-m", "--model", help="Model file (.bnr or .gguf) or the name of a stored model "
                        "(bitnet-run list); default: the bundled demo model.")
ThreadsOpt = typer.Option(None, "-t", "--threads", help="Threads (default: one per physical core).")
CtxOpt = typer.Option(None, "-c", "--ctx-size", help="Context size in tokens (default: the model's).")
TempOpt = typer.Option(0.8, "--temp", help="Temperature; 0 = greedy.")
TopKOpt = typer.Option(40, "--top-k", help="Top-k sampling; 0 = off.")
TopPOpt = typer.Option(0.95, "--top-p", help="Top-p (nucleus) sampling; 1 = off.")
MinPOpt = typer.Option(0.05, "--min-p", help="Min-p sampling; 0 = off.")
RepeatOpt = typer.Option(1.1, "--repeat-penalty", help="Penalty for the last 64 tokens; 1 = off.")
SeedOpt = typer.Option(-1, "--seed", "-s", help="RNG seed; -1 = random.")
StopOpt = typer.Option(None, "--stop", help="Stop when the text contains this string (not printed); repeatable.")
CacheTypeOpt = typer.Option("f16", "--cache-type", help="KV cache element type: f16 or f32.")


def _default_threads() -> int:
    from ._bitnet import lib

    return lib.bn_default_n_threads()


def _model_path(model: Optional[str]) -> Path:
    """The model file of a -m argument (bitnet_run.store.resolve_model: a path, a GGUF file imported
    once into the store, or a stored model's name); the demo model when None. Failures are one line."""
    from .store import resolve_model

    try:
        return default_model() if model is None else resolve_model(model, reporting=_reporting)
    except (OSError, ValueError) as exc:
        _fail(str(exc))


def _load(model: Optional[str], threads: Optional[int], ctx: Optional[int], kv_type: str = "f16"):
    from .model import KV_TYPES, Model

    if kv_type not in KV_TYPES:
        _fail(f"--cache-type must be {' or '.join(KV_TYPES)}, not {kv_type!r}")
    path = _model_path(model)
    try:
        return Model(path, n_threads=threads, n_ctx=ctx, kv_type=kv_type)
    except (OSError, ValueError, BitNetError) as exc:
        _fail(str(exc))


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed) -> dict:
    from .sampling import SamplingParams

    params = dict(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
        seed=None if seed < 0 else seed,
    )
    try:
        SamplingParams(**params)
    except ValueError as exc:
        _fail(str(exc))
    return params


def _print_timings(stats) -> None:
    """llama.cpp-style timings: the prompt, then generation end to end (what the user waited, sampling
    and detokenization included) and the decoding evaluations alone."""
    err_console.print(
        f"\nprompt eval: {stats.prompt_tokens} tokens ({stats.cached_tokens} cached) in {stats.prompt_seconds:.3f} s "
        f"({stats.prompt_tps:.2f} tokens/s)\n"
        f"generation:  {stats.generated_tokens} tokens in {stats.total_seconds - stats.prompt_seconds:.3f} s "
        f"({stats.end_to_end_tps:.2f} tokens/s end-to-end); eval {stats.eval_tokens} tokens in "
        f"{stats.generation_seconds:.3f} s ({stats.generation_tps:.2f} tokens/s)",
        highlight=False, soft_wrap=True,
    )


def _write_reply(pieces) -> bool:
    """Writes the text pieces to stdout as they come; Ctrl-C ends the reply early. True if interrupted."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return True
    finally:
        pieces.close()  # releases the context at once, also when interrupted between two tokens
    return False


def _progress() -> Progress:
    # no bar at all when stderr is not a terminal: its frames would only fill logs
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err_console, disable=not err_console.is_terminal,
    )


@contextmanager
def _reporting(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr; yields the progress(done, total, name) callback the file writers take.
    Call _fail only outside the `with`: the bar is stopped by then, so the error gets a line of its own."""
    with _progress() as progress:
        task = progress.add_task(description, total=None, item="")

        def report(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, item=name)

        yield report


def _convert(src: str, output: Path, weights: str = "i2", head: Optional[str] = None,
             chat_template: Optional[Path] = None) -> Path:
    from .convert import ConversionError, convert_checkpoint
    from .convert.gguf_import import convert_gguf, is_gguf_file

    try:
        template = chat_template.read_text(encoding="utf-8") if chat_template is not None else None
        with _reporting("converting") as report:
            if is_gguf_file(src):
                return convert_gguf(src, output, report, weights=weights, head=head, chat_template=template)
            if template is not None:
                raise ConversionError("--chat-template applies to GGUF files (a checkpoint carries its own template)")
            return convert_checkpoint(src, output, progress=report, weights=weights, head=head)
    except (ConversionError, OSError, UnicodeDecodeError) as exc:
        _fail(str(exc))


def _check_encodings(weights: str, head: Optional[str]) -> None:
    if weights not in ("i2", "tl1", "tl2"):
        _fail(f"--weights must be i2, tl1 or tl2, not {weights!r}")
    if head is not None and head not in ("bf16", "f16", "f32", "q8", "q6", "q4"):
        _fail(f"--head must be bf16, f16, f32, q8, q6 or q4, not {head!r}")


WeightsOpt = typer.Option("i2", "--weights", help="Ternary weight encoding: i2, tl1 or tl2.")
HeadOpt = typer.Option(None, "--head", help="Output head encoding: bf16, f16, f32, q8 (8-bit rows, about half "
                       "the bytes of bf16), q6 or q4 (6- or 4-bit blocks of 32 with their own scales). Default: "
                       "the checkpoint's dtype.")


# ---- commands -------------------------------------------------------------------------------------
@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint folder, a hub repo id, or a GGUF file."),
    output: Path = typer.Option(..., "-o", "--output", help="The .bnr file to write."),
    weights: str = WeightsOpt,
    head: Optional[str] = HeadOpt,
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="A jinja chat template file to "
                                                 "store instead of the GGUF file's own."),
):
    """Convert a Hugging Face BitNet checkpoint or a GGUF file into a packed .bnr model file."""
    _check_encodings(weights, head)
    path = _convert(src, output, weights, head, chat_template)
    err_console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", highlight=False)


@app.command()
def pull(
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. microsoft/bitnet-b1.58-2B-4T or "
                                  "microsoft/bitnet-b1.58-2B-4T-gguf."),
    file: Optional[str] = typer.Option(None, "--file", help="One GGUF file of the repo (default for a repo named "
                                       "*gguf*: ggml-model-i2_s.gguf)."),
    weights: str = WeightsOpt,
    head: Optional[str] = HeadOpt,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the .bnr file here instead of "
                                          "into the model store."),
):
    """Download a model from the Hugging Face hub and convert it into the model store (needs network,
    or HF_HUB_OFFLINE=1 with the files in the Hugging Face cache). Run it by name: -m REPO."""
    from .convert import ConversionError
    from .store import pull as pull_model

    _check_encodings(weights, head)
    try:
        path = pull_model(repo_id, file, weights, head, reporting=_reporting, output=output)
    except (ConversionError, OSError) as exc:
        _fail(str(exc))
    err_console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", highlight=False)


@app.command("list")
def list_cmd():
    """List the models in the store ($BITNET_RUN_HOME/models, default ~/.cache/bitnet-run/models)."""
    from .store import describe, entries

    columns = ("name", "family", "parameters", "encoding", "size", "source", "converted")
    rows = [describe(entry) for entry in entries()]
    if not rows:
        err_console.print("no models in the store (bitnet-run pull REPO adds one)", highlight=False)
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        typer.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


@app.command("rm")
def rm_cmd(names: List[str] = typer.Argument(..., help="Names of stored models (bitnet-run list).")):
    """Remove models from the store."""
    from .store import remove

    for name in names:
        try:
            entry = remove(name)
        except OSError as exc:
            _fail(str(exc))
        err_console.print(f"removed {entry.name}", highlight=False)


@app.command("run")
def run_cmd(
    model: Optional[str] = ModelOpt,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The prompt."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt from a file."),
    n_predict: int = typer.Option(128, "-n", "--n-predict", help="Tokens to generate."),
    threads: Optional[int] = ThreadsOpt,
    ctx_size: Optional[int] = CtxOpt,
    temp: float = TempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: int = SeedOpt,
    no_display_prompt: bool = typer.Option(False, "--no-display-prompt", help="Print only the generated text."),
    stop: Optional[List[str]] = StopOpt,
    cache_type: str = CacheTypeOpt,
):
    """Generate a continuation of a prompt (alias: generate). Ctrl-C stops with the text so far."""
    if prompt is not None and file is not None:
        _fail("give the prompt with -p or -f, not both")
    if file is not None:
        try:
            prompt = file.read_text()
        except OSError as exc:
            _fail(f"{file}: cannot read the prompt file ({exc.strerror})")
    if prompt is None:
        prompt = ""
    if n_predict < 0:
        _fail(f"-n must be >= 0, got {n_predict}")
    sampling = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    llm = _load(model, threads, ctx_size, cache_type)
    if not no_display_prompt:
        sys.stdout.write(prompt)
    try:
        interrupted = _write_reply(llm.stream(prompt, max_tokens=n_predict, stop=stop, **sampling))
    except (ValueError, BitNetError) as exc:
        _fail(str(exc))
    sys.stdout.write("\n")
    _print_timings(llm.last_stats)
    if interrupted:
        raise typer.Exit(130)


app.command("generate", help="Generate a continuation of a prompt (alias of run).")(run_cmd)


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
    n_predict: int = typer.Option(512, "-n", "--n-predict", help="Most tokens per reply."),
    threads: Optional[int] = ThreadsOpt,
    ctx_size: Optional[int] = CtxOpt,
    temp: float = TempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: int = SeedOpt,
    stop: Optional[List[str]] = StopOpt,
    cache_type: str = CacheTypeOpt,
):
    """Chat with the model in the terminal (/reset clears the conversation, /exit or Ctrl-D quits; Ctrl-C
    ends the current reply). Each turn evaluates only the new tokens: the cache keeps the conversation."""
    sampling = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    llm = _load(model, threads, ctx_size, cache_type)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err_console.print("chat: /reset clears the conversation, /exit quits", highlight=False)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(start)
            err_console.print("(conversation cleared)", highlight=False)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = []

        def pieces():
            for piece in llm.stream_chat(messages, max_tokens=n_predict, stop=stop, **sampling):
                reply.append(piece)
                yield piece

        try:
            interrupted = _write_reply(pieces())
        except (ValueError, BitNetError) as exc:
            messages.pop()
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            continue
        sys.stdout.write("\n")
        # an interrupted reply stays in the conversation as far as it got (so does the cache)
        messages.append({"role": "assistant", "content": "".join(reply)})
        stats = llm.last_stats
        err_console.print(
            f"[dim]({'interrupted; ' if interrupted else ''}{stats.generated_tokens} tokens, "
            f"{stats.end_to_end_tps:.1f} tokens/s end-to-end, {stats.generation_tps:.1f} eval; "
            f"prompt {stats.prompt_tokens} evaluated + {stats.cached_tokens} cached)[/]", highlight=False,
            soft_wrap=True)


@app.command()
def perplexity(
    model: Optional[str] = ModelOpt,
    file: Path = typer.Option(..., "-f", "--file", help="The text to score."),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", help="Window size in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows (default: all)."),
    threads: Optional[int] = ThreadsOpt,
    cache_type: str = CacheTypeOpt,
):
    """Perplexity of a text file, llama-perplexity style: non-overlapping windows of -c tokens, each
    from a fresh cache starting with BOS, the second half of each window scored."""
    from .perplexity import perplexity as score

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{file}: cannot read the text file ({getattr(exc, 'strerror', None) or exc})")
    llm = _load(model, threads, max(ctx_size, 1), cache_type)

    def progress(done: int, total: int, ppl: float) -> None:
        err_console.print(f"[{done}/{total}] {ppl:.4f}", highlight=False)

    try:
        result = score(llm, text, n_ctx=ctx_size, n_chunks=chunks, progress=progress)
    except (ValueError, BitNetError) as exc:
        _fail(f"{file}: {exc}")
    typer.echo(f"perplexity: {result.perplexity:.4f} ({result.n_chunks} chunks of {result.n_ctx} tokens, "
               f"{result.n_scored} tokens scored)")


@app.command()
def show(
    model: Optional[str] = typer.Argument(None, help="Model file (.bnr or .gguf) or a stored model's name; "
                                          "default: the demo model."),
    model_opt: Optional[str] = typer.Option(None, "-m", "--model", help="The same, as an option."),
):
    """Print a model file's metadata and tensor table."""
    from .fileformat import read_header

    if model is not None and model_opt is not None:
        _fail("give the model as an argument or with -m, not both")
    path = _model_path(model if model is not None else model_opt)
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    # plain aligned text rather than a rich table: it stays greppable and never truncates names
    width = max((len(key) for key in header.metadata), default=0)
    typer.echo("metadata:")
    for key, value in header.metadata.items():
        if isinstance(value, str) and (len(value) > 120 or "\n" in value):
            value = f"<{len(value)} characters>"
        typer.echo(f"  {key:<{width}}  {value}")
    total = sum(t.nbytes for t in header.tensors)
    typer.echo(f"tensors: {len(header.tensors)}, {total / 2**20:.2f} MiB")
    width = max((len(t.name) for t in header.tensors), default=4)
    typer.echo(f"  {'name':<{width}}  {'encoding':<8}  {'shape':<14}  {'scale':>10}  {'offset':>12}  {'bytes':>12}")
    for t in header.tensors:
        shape = "x".join(str(d) for d in t.dims)
        typer.echo(
            f"  {t.name:<{width}}  {t.encoding_name:<8}  {shape:<14}  {t.scale:>10.6g}  {t.offset:>12}  {t.nbytes:>12}"
        )


def _cached_or_written(cached: Optional[Path], what: str, bar: str,
                       write: Callable[[Callable[[int, int, str], None]], Path]) -> Path:
    """`cached` when there is one; else write(progress) under a progress bar titled `bar`, announced on
    stderr as writing `what`. A failed write is a one-line error."""
    if cached is not None:
        return cached
    err_console.print(f"writing {what} (once)", highlight=False)
    try:
        with _reporting(bar) as report:
            return write(report)
    except (OSError, ValueError, RuntimeError) as exc:
        _fail(f"cannot write {what}: {exc}")


def _synthetic_model(shape: str, head: str, weights: str, cache_dir: Optional[Path]) -> Path:
    """The cached synthetic model file of `shape`, written once if absent or stale."""
    from .bench import synthetic as syn

    return _cached_or_written(
        syn.cached_path(shape, cache_dir, head=head, weights=weights),
        f"the synthetic model {syn.file_name(shape, head, weights)} into {cache_dir or syn.default_cache_dir()}",
        f"synthetic {shape} {weights}",
        lambda report: syn.ensure_synthetic(shape, cache_dir, progress=report, head=head, weights=weights),
    )


def _peer_models(shape: str, head: str, cache_dir: Optional[Path], peer_list: list, peer_bins: dict) -> list:
    """(runtime name, GGUF path, facts) of every peer on `shape`, each GGUF written once if absent or
    stale, with the head matching ours (bf16 -> F16, q8 -> Q8_0): llama.cpp TQ2_0 and TQ1_0,
    bitnet.cpp I2_S, ik_llama.cpp IQ2_BN and IQ2_BN_R4 (made by its own llama-quantize). A peer
    with a --peer-bin is timed by that llama-bench (facts["llama_bench"])."""
    from .bench import peers as pr
    from .bench import synthetic as syn

    gguf_head = "f16" if head == "bf16" else "q8_0"
    out = []

    def add(runtime: str, peer: str, linear_type: str, architecture: Optional[str], cached, write) -> None:
        name = pr.gguf_file_name(shape, linear_type, gguf_head, architecture)
        path = _cached_or_written(cached, f"the {runtime} GGUF {name}", f"GGUF {shape} {linear_type}", write)
        facts = pr.gguf_facts(shape, linear_type, gguf_head, architecture)
        if peer in peer_bins:
            facts["llama_bench"] = peer_bins[peer]
        out.append((f"{runtime} {linear_type}", path, facts))

    for peer in peer_list:
        if peer == "llamacpp":
            for lt in pr.LINEAR_TYPES:
                add("llama.cpp", peer, lt, None, pr.cached_gguf(shape, lt, gguf_head, cache_dir),
                    lambda report, lt=lt: pr.ensure_gguf(shape, lt, gguf_head, cache_dir, progress=report))
        elif peer == "bitnetcpp":
            add("bitnet.cpp", peer, pr.I2S, None, pr.cached_gguf(shape, pr.I2S, gguf_head, cache_dir),
                lambda report: pr.ensure_gguf(shape, pr.I2S, gguf_head, cache_dir, progress=report))
        elif peer == "ikllama":
            quantize = peer_bins[peer].parent / "llama-quantize"
            ik_arch = pr.ik_architecture(syn.get_shape(shape))
            for lt in pr.IK_TYPES:
                add("ik_llama.cpp", peer, lt, ik_arch, pr.cached_gguf(shape, lt, gguf_head, cache_dir, architecture=ik_arch),
                    lambda report, lt=lt: pr.ensure_ik_gguf(shape, lt, gguf_head, quantize, cache_dir, progress=report))
    return out


@app.command()
def bench(
    model: Optional[List[str]] = typer.Option(
        None, "-m", "--model", help="Model file(s) (.bnr, .gguf) or stored models' names: repeat -m or give a comma "
        "list. Default: the demo model, unless --synthetic is given."),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Synthetic random-ternary shape(s), comma list: tiny, tiny-tq, large-700m, 2b-4t, "
        "3b, 8b (written once into the cache)."),
    n_prompt: str = typer.Option("512", "-p", "--n-prompt", help="Prompt lengths for ppN tests: N, A-B, A-B+S, A-B*M, "
                                 "comma lists; 0 = none."),
    n_gen: str = typer.Option("128", "-n", "--n-gen", help="Generated tokens for tgN tests (same syntax); 0 = none."),
    repetitions: int = typer.Option(5, "-r", "--repetitions", help="Timed runs per test (after one warm-up)."),
    threads: Optional[str] = typer.Option(None, "-t", "--threads", help="Thread counts, e.g. 1,2 or 1-8*2 "
                                          "(default: one per physical core)."),
    output: str = typer.Option("md", "-o", "--output", help="md, json or csv."),
    peers: str = typer.Option("none", "--peers", help="Peer runtimes to run on the same synthetic shape, interleaved "
                              "A/B, comma list: none, llamacpp (llama.cpp TQ2_0 and TQ1_0 through llama-cpp-python), "
                              "bitnetcpp (bitnet.cpp I2_S), ikllama (ik_llama.cpp IQ2_BN, IQ2_BN_R4)."),
    peer_bin: Optional[List[str]] = typer.Option(
        None, "--peer-bin", help="NAME=PATH: a peer's own llama-bench binary (repeatable); needed by bitnetcpp and "
        "ikllama (ikllama also uses the llama-quantize next to it); llamacpp=PATH runs llama.cpp's instead of "
        "llama-cpp-python."),
    head: str = typer.Option("bf16", "--head", help="Output head of the synthetic models: bf16 (peers: F16), q8 "
                             "(peers: Q8_0), q6 or q4 (no peers)."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Ternary weight encodings of the synthetic models, comma list of i2, tl1, tl2 "
        "(default: i2). Each is its own file holding the same weights; they run interleaved, test by test."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where synthetic models are cached "
                                             "(default: $XDG_CACHE_HOME/bitnet-run/synthetic)."),
    membw_mib: int = typer.Option(512, "--membw-mib", help="Buffer of the read-bandwidth probe, MiB."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One untimed run before each test."),
    kernels: bool = typer.Option(False, "--kernels", help="Instead of whole-model tests, time each kernel variant "
                                 "on the models' ternary matrix shapes (1 token and each -p length)."),
    e2e: bool = typer.Option(False, "--e2e", help="Also time end-to-end generation (stream_generate with the default "
                             "sampling) next to each tgN: rows e2eN."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="Also decode S sequences together next to each "
                                           "tgN, comma list of S (e.g. 1,2,4,8): rows 'tgN xS', aggregate t/s."),
):
    """Measure prompt processing (ppN) and generation (tgN) tokens/s, llama-bench style.

    Runs every combination of models x threads x tests; tokenisation and sampling are not timed.
    Each report shows the read bandwidth and the decoding ceiling it implies.
    """

    from .bench import runner as bn
    from .bench import synthetic as syn
    from .errors import BitNetError as _BitNetError

    try:
        if output not in bn.OUTPUT_FORMATS:
            raise bn.BenchError(f"-o: unknown output format {output!r} (expected md, json or csv)")
        if head not in ("bf16", "q8") and peers.strip() not in ("", "none"):
            raise bn.BenchError(f"--peers needs --head bf16 or q8 (the peers then get an F16 or Q8_0 head), not {head!r}")
        peer_bins = bn.parse_peer_bins(peer_bin or [])
        peer_list = bn.check_peers(peers, peer_bins)
        if head not in syn.HEADS:
            raise bn.BenchError(f"--head must be one of {', '.join(syn.HEADS)}, not {head!r}")
        if peer_list and (model or not synthetic):
            raise bn.BenchError("--peers runs only on --synthetic shapes (the same shape is written as GGUF)")
        if weights is not None and not synthetic:
            raise bn.BenchError("--weights applies to --synthetic shapes (a -m file keeps the encoding it was "
                                "converted with)")
        weight_list = bn.parse_weights(weights) if weights is not None else ["i2"]
        p_list = bn.parse_int_list(n_prompt, "-p")
        n_list = bn.parse_int_list(n_gen, "-n")
        t_list = bn.parse_int_list(threads, "-t", minimum=1) if threads is not None else [_default_threads()]
        shapes = list(dict.fromkeys(s.strip() for s in synthetic.split(","))) if synthetic is not None else []
        for shape in shapes:
            syn.get_shape(shape)
            from .bench import peers as pr

            for peer in peer_list:
                pr.check_shape(shape, {"llamacpp": pr.LINEAR_TYPES, "bitnetcpp": (pr.I2S,), "ikllama": (pr.I2S,) + pr.IK_TYPES}[peer],
                               f"--peers {peer}")
        names = [m.strip() for item in (model or []) for m in item.split(",") if m.strip()]
        # a file is labelled by its stem, a stored model by its name
        labelled = [(Path(m).stem if Path(m).is_file() else m, _model_path(m)) for m in names]
        if not labelled and not shapes:
            labelled = [(default_model().stem, default_model())]
        spec = bn.BenchSpec(
            models=labelled, n_prompt=p_list, n_gen=n_list, threads=t_list,
            repetitions=repetitions, membw_bytes=max(membw_mib, 0) << 20, warmup=warmup, e2e=e2e,
            parallel=bn.parse_int_list(parallel, "--parallel", minimum=1) if parallel is not None else [],
        )
        bn.validate(spec, models=False)  # the synthetic models are added below, once written
    except (bn.BenchError, ValueError, OSError) as exc:
        _fail(str(exc))

    for shape in shapes:
        # one label for every encoding of a shape: they form one group, timed with the same peers
        label = f"synthetic {shape}" if head == "bf16" else f"synthetic {shape} {head} head"
        for encoding in weight_list:
            spec.models.append((label, _synthetic_model(shape, head, encoding, cache_dir)))
        if peer_list:
            spec.peers[label] = _peer_models(shape, head, cache_dir, peer_list, peer_bins)

    def log(message: str) -> None:
        err_console.print(f"[dim]bench: {message}[/]", highlight=False)

    try:
        if kernels:
            sys.stdout.write(bn.format_kernel_rows(bn.run_kernels(spec, log=log), output))
            return
        rows = bn.run(spec, log=log)
    except (bn.BenchError, ValueError, OSError, MemoryError, RuntimeError, _BitNetError) as exc:
        _fail(str(exc))
    sys.stdout.write(bn.format_rows(rows, output))


# ---- serving (docs/serving.md) ---------------------------------------------------------------------
@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    parallel: int = typer.Option(4, "--parallel", "-np", help="Slots: requests decoded together in one batch."),
    ctx_size: Optional[int] = typer.Option(None, "-c", "--ctx-size", help="Context size per slot in tokens "
                                           "(default: the model's, at most 4096)."),
    threads: Optional[int] = ThreadsOpt,
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="BITNET_RUN_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (also $BITNET_RUN_API_KEY)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a slot; beyond: 503."),
    cache_type: str = typer.Option("f16", "--cache-type", help="KV cache type: f16 or f32."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Model id in the API (default: the file name)."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="Seconds SIGTERM waits for streams in flight."),
):
    """Serve the model over an OpenAI-compatible HTTP API with continuous batching."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    if cache_type not in ("f16", "f32"):
        _fail(f"--cache-type must be f16 or f32, not {cache_type!r}")
    for name, value, low in (("--parallel", parallel, 1), ("--max-queue", max_queue, 0), ("-c", ctx_size, 1),
                             ("-t", threads, 1), ("--port", port, 0)):
        if value is not None and value < low:
            _fail(f"{name} must be >= {low}, got {value}")
    path = _model_path(model)
    config = ServeConfig(path, model_name=alias, n_parallel=parallel, n_ctx=ctx_size, n_threads=threads,
                         kv_type=cache_type, api_key=api_key, max_queue=max_queue)
    err_console.print(f"serve: {path} on http://{host}:{port} ({parallel} slots)", highlight=False)
    raise typer.Exit(run_server(config, host=host, port=port, drain_timeout=drain_timeout))


@app.command("bench-serve")
def bench_serve(
    url: Optional[List[str]] = typer.Option(None, "--url", help="Running OpenAI-compatible server(s) to load, "
                                            "LABEL=URL or URL (repeat or comma list)."),
    model: Optional[Path] = typer.Option(None, "-m", "--model", help="Start `bitnet-run serve` on this model."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Start `bitnet-run serve` on this synthetic "
                                            "shape (e.g. 2b-4t; written once into the cache)."),
    peers: str = typer.Option("none", "--peers", help="none or llamacpp: also start llama.cpp's server "
                              "(llama-cpp-python[server]) on the same shape's TQ2_0 GGUF (--synthetic only)."),
    concurrency: str = typer.Option("1,4,8", "--concurrency", help="Concurrent streams, comma list."),
    duration: float = typer.Option(30.0, "--duration", help="Seconds of load per server and concurrency."),
    n_prompt: int = typer.Option(32, "-p", "--n-prompt", help="Prompt tokens per request."),
    n_gen: int = typer.Option(64, "-n", "--n-gen", help="max_tokens per request (greedy)."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="Threads of the servers it starts "
                                          "(default: one per physical core)."),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", help="Context per slot of the servers it starts."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer token for --url servers."),
    output: str = typer.Option("md", "-o", "--output", help="md or json."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where synthetic models are cached."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One untimed request per server first."),
):
    """Load-test servers: N concurrent streaming clients for a fixed time (requests/s, tokens/s, TTFT, ITL)."""
    import tempfile

    from .bench import serve as bs

    try:
        streams = [int(c) for c in concurrency.split(",") if c.strip()]
        if not streams or min(streams) < 1:
            raise bs.BenchServeError(f"--concurrency must be positive integers, got {concurrency!r}")
        if output not in ("md", "json"):
            raise bs.BenchServeError(f"-o must be md or json, not {output!r}")
        if peers not in ("none", "llamacpp"):
            raise bs.BenchServeError(f"--peers must be none or llamacpp, not {peers!r}")
        if peers != "none" and not synthetic:
            raise bs.BenchServeError("--peers runs on a --synthetic shape (the same shape is written as GGUF)")
        if model is not None and synthetic:
            raise bs.BenchServeError("give -m or --synthetic, not both")
        if duration <= 0 or n_prompt < 1 or n_gen < 1:
            raise bs.BenchServeError("--duration, -p and -n must be positive")
        targets = []
        for item in (u.strip() for entry in (url or []) for u in entry.split(",")):
            if item:
                label, _, address = item.rpartition("=")
                targets.append(bs.Target(label or address, address.rstrip("/"), api_key))
        if model is not None and not model.is_file():
            raise bs.BenchServeError(f"{model}: no such model file")
        if not targets and model is None and not synthetic:
            raise bs.BenchServeError("nothing to load: give --url, -m or --synthetic")
        if synthetic:
            from .bench import synthetic as syn

            syn.get_shape(synthetic)
    except (bs.BenchServeError, ValueError) as exc:
        _fail(str(exc))

    n_threads = threads or _default_threads()
    gguf = None
    if synthetic:
        model = _synthetic_model(synthetic, "bf16", "i2", cache_dir)
        if peers == "llamacpp":
            from .bench import peers as pr

            pr.check_shape(synthetic)
            gguf = _cached_or_written(
                pr.cached_gguf(synthetic, "TQ2_0", "f16", cache_dir),
                f"the llama.cpp GGUF {pr.gguf_file_name(synthetic, 'TQ2_0', 'f16')}", f"GGUF {synthetic} TQ2_0",
                lambda report: pr.ensure_gguf(synthetic, "TQ2_0", "f16", cache_dir, progress=report))

    def log(message: str) -> None:
        err_console.print(f"[dim]bench-serve: {message}[/]", highlight=False)

    launched = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as logs:
        try:
            if model is not None:
                log(f"starting bitnet-run serve on {model} ({n_threads} threads, {max(streams)} slots)")
                ours = bs.launch_ours(model, n_threads, max(streams), ctx_size, Path(logs))
                launched.append(ours)
                targets.append(bs.Target("bitnet-run", ours.wait_ready().url))
            if gguf is not None:
                log(f"starting llama.cpp's server on {gguf} ({n_threads} threads)")
                peer = bs.launch_llamacpp(gguf, n_threads, ctx_size, Path(logs))
                launched.append(peer)
                targets.append(bs.Target("llama.cpp TQ2_0", peer.wait_ready(health="/v1/models").url,
                                         text_prompts=True))
            rows = bs.run(targets, streams, duration, bs.prompt_tokens(n_prompt), n_gen, warmup=warmup, log=log)
        except (bs.BenchServeError, OSError) as exc:
            _fail(str(exc))
        finally:
            for server in launched:
                server.stop()
    meta = dict(bs.machine_facts(), threads=n_threads, n_prompt=n_prompt, n_gen=n_gen, duration_s=duration,
                command=" ".join(sys.argv))
    sys.stdout.write(bs.format_rows(rows, output, meta))


if __name__ == "__main__":
    app()
