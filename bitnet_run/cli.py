"""The `bitnet-run` command line: convert, pull, list, rm, run (generate), chat, show, bench.

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


def _load(model: Optional[str], threads: Optional[int], ctx: Optional[int]):
    from .model import Model

    path = _model_path(model)
    try:
        return Model(path, n_threads=threads, n_ctx=ctx)
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
    err_console.print(
        f"\nprompt eval: {stats.prompt_tokens} tokens in {stats.prompt_seconds:.3f} s "
        f"({stats.prompt_tps:.2f} tokens/s)\n"
        f"generation:  {stats.generated_tokens} tokens in {stats.generation_seconds:.3f} s "
        f"({stats.generation_tps:.2f} tokens/s)",
        highlight=False,
    )


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
    if head is not None and head not in ("bf16", "f16", "f32", "q8"):
        _fail(f"--head must be bf16, f16, f32 or q8, not {head!r}")


WeightsOpt = typer.Option("i2", "--weights", help="Ternary weight encoding: i2, tl1 or tl2.")
HeadOpt = typer.Option(None, "--head", help="Output head encoding: bf16, f16, f32 or q8 (8-bit rows, about half "
                       "the bytes of bf16). Default: the checkpoint's dtype.")


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
):
    """Generate a continuation of a prompt (alias: generate)."""
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
    llm = _load(model, threads, ctx_size)
    if not no_display_prompt:
        sys.stdout.write(prompt)
    try:
        for piece in llm.stream(prompt, max_tokens=n_predict, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, BitNetError) as exc:
        _fail(str(exc))
    sys.stdout.write("\n")
    _print_timings(llm.last_stats)


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
):
    """Chat with the model in the terminal (/reset clears the conversation, /exit or Ctrl-D quits)."""
    sampling = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    llm = _load(model, threads, ctx_size)
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
        try:
            for piece in llm.stream_chat(messages, max_tokens=n_predict, **sampling):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (ValueError, BitNetError) as exc:
            messages.pop()
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        stats = llm.last_stats
        err_console.print(f"[dim]({stats.generation_tps:.1f} tokens/s)[/]", highlight=False)


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
    except (OSError, ValueError) as exc:
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


def _peer_models(shape: str, head: str, cache_dir: Optional[Path]) -> list:
    """(runtime name, GGUF path, facts) of llama.cpp on `shape` in each TQ type, each GGUF written
    once if absent or stale, with the head matching ours (bf16 -> F16, q8 -> Q8_0)."""
    from .bench import peers as pr

    gguf_head = "f16" if head == "bf16" else "q8_0"
    out = []
    for linear_type in pr.LINEAR_TYPES:
        path = _cached_or_written(
            pr.cached_gguf(shape, linear_type, gguf_head, cache_dir),
            f"the llama.cpp GGUF {pr.gguf_file_name(shape, linear_type, gguf_head)}",
            f"GGUF {shape} {linear_type}",
            lambda report, lt=linear_type: pr.ensure_gguf(shape, lt, gguf_head, cache_dir, progress=report),
        )
        out.append((f"llama.cpp {linear_type}", path, pr.gguf_facts(shape, linear_type, gguf_head)))
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
                              "A/B: none or llamacpp (llama.cpp TQ2_0 and TQ1_0 through llama-cpp-python)."),
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
        peer_list = bn.check_peers(peers)
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
            if peer_list:
                from .bench.peers import check_shape

                check_shape(shape)
        names = [m.strip() for item in (model or []) for m in item.split(",") if m.strip()]
        # a file is labelled by its stem, a stored model by its name
        labelled = [(Path(m).stem if Path(m).is_file() else m, _model_path(m)) for m in names]
        if not labelled and not shapes:
            labelled = [(default_model().stem, default_model())]
        spec = bn.BenchSpec(
            models=labelled, n_prompt=p_list, n_gen=n_list, threads=t_list,
            repetitions=repetitions, membw_bytes=max(membw_mib, 0) << 20, warmup=warmup,
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
            spec.peers[label] = _peer_models(shape, head, cache_dir)

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
