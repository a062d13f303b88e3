"""The `bitnet-run` command line: convert, pull, run (generate), chat, perplexity, show, bench.

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
from .paths import default_model, models_dir

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
ModelOpt = typer.Option(None, "-m", "--model", help="Model file (.bnr); default: the bundled demo model.")
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


def _load(model: Optional[Path], threads: Optional[int], ctx: Optional[int], kv_type: str = "f16"):
    from .model import KV_TYPES, Model

    if kv_type not in KV_TYPES:
        _fail(f"--cache-type must be {' or '.join(KV_TYPES)}, not {kv_type!r}")
    try:
        path = model if model is not None else default_model()
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
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err_console,
    )


@contextmanager
def _reporting(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr; yields the progress(done, total, name) callback the file writers take."""
    with _progress() as progress:
        task = progress.add_task(description, total=None, item="")

        def report(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, item=name)

        yield report


def _convert(src: str, output: Path, weights: str = "i2", head: Optional[str] = None) -> Path:
    from .convert import ConversionError, convert_checkpoint

    with _reporting("converting") as report:
        try:
            return convert_checkpoint(src, output, progress=report, weights=weights, head=head)
        except (ConversionError, OSError) as exc:
            _fail(str(exc))


# ---- commands -------------------------------------------------------------------------------------
@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint folder, or a hub repo id."),
    output: Path = typer.Option(..., "-o", "--output", help="The .bnr file to write."),
    weights: str = typer.Option("i2", "--weights", help="Ternary weight encoding: i2, tl1 or tl2."),
    head: Optional[str] = typer.Option(None, "--head", help="Output head encoding: bf16, f16, f32 or q8 "
                                       "(8-bit rows, about half the bytes of bf16). Default: the checkpoint's dtype."),
):
    """Convert a Hugging Face BitNet checkpoint into a packed .bnr model file."""
    if weights not in ("i2", "tl1", "tl2"):
        _fail(f"--weights must be i2, tl1 or tl2, not {weights!r}")
    if head is not None and head not in ("bf16", "f16", "f32", "q8"):
        _fail(f"--head must be bf16, f16, f32 or q8, not {head!r}")
    path = _convert(src, output, weights, head)
    err_console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", highlight=False)


@app.command()
def pull(
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. microsoft/bitnet-b1.58-2B-4T."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the .bnr file."),
):
    """Download a checkpoint from the Hugging Face hub and convert it (needs network)."""
    target = output or models_dir() / (repo_id.replace("/", "--") + ".bnr")
    target.parent.mkdir(parents=True, exist_ok=True)
    path = _convert(repo_id, target)
    err_console.print(f"wrote {path}", highlight=False)


@app.command("run")
def run_cmd(
    model: Optional[Path] = ModelOpt,
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
    model: Optional[Path] = ModelOpt,
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
    model: Optional[Path] = ModelOpt,
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
def show(model: Optional[Path] = typer.Argument(None, help="Model file (.bnr); default: the demo model.")):
    """Print a model file's metadata and tensor table."""
    from .fileformat import read_header

    try:
        header = read_header(model if model is not None else default_model())
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
        None, "-m", "--model", help="Model file(s) (.bnr): repeat -m or give a comma list. Default: the demo model, "
        "unless --synthetic is given."),
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
    head: str = typer.Option("bf16", "--head", help="Output head of the synthetic models: bf16 (peers: F16) or q8 "
                             "(peers: Q8_0)."),
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
                pr.check_shape(shape, {"llamacpp": pr.LINEAR_TYPES, "bitnetcpp": (pr.I2S,), "ikllama": pr.IK_TYPES}[peer],
                               f"--peers {peer}")
        paths = [Path(m.strip()) for item in (model or []) for m in item.split(",") if m.strip()]
        if not paths and not shapes:
            paths = [default_model()]
        for path in paths:
            if not path.is_file():
                raise bn.BenchError(f"{path}: no such model file")
        spec = bn.BenchSpec(
            models=[(p.stem, p) for p in paths], n_prompt=p_list, n_gen=n_list, threads=t_list,
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


if __name__ == "__main__":
    app()
