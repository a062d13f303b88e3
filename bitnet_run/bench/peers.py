"""Peer runtimes for `bitnet-run bench --peers`: the same synthetic shape as GGUF for llama.cpp
(through llama-cpp-python), timed the way bench.py times bitnet-run.

`write_gguf` writes a synthetic shape (bitnet_run/bench/synthetic.py) as a GGUF that llama.cpp loads:
its `bitnet` architecture for shapes with sub-norms, `llama` for the others, the tensors of the
shape's plan (convert/arch.py) under their llama.cpp names (arch.gguf_name: token_embd, output_norm,
blk.N.attn_q, ...); linears as TQ2_0 or TQ1_0 (random ternary weights times one scale per
tensor, quantized with gguf.quants.quantize), norms F32, the tied embedding (= output head) Q8_0 or F16.
The weights are random (seeded) and llama.cpp's bitnet graph gates the FFN with SiLU instead of
relu2: fine for timing, meaningless for outputs.

`time_llamacpp` times only the evaluation of token ids (Llama.eval), never tokenisation or
sampling: ppN = one eval of N random ids from an empty cache, tgN = N evals of one id each.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..convert import arch
from . import synthetic as syn

GGUF_FORMAT = 1  # bump when the files written here change, so stale caches are rewritten
LINEAR_TYPES = ("TQ2_0", "TQ1_0")
GGUF_HEADS = ("q8_0", "f16")

def gguf_plan(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0") -> list[tuple[str, str, tuple[int, ...], str]]:
    """(gguf name, kind, dims as (rows, cols) like ours, ggml type name) of every tensor, in write order."""
    if linear_type not in LINEAR_TYPES:
        raise ValueError(f"unknown linear type {linear_type!r} (known: {', '.join(LINEAR_TYPES)})")
    if head not in GGUF_HEADS:
        raise ValueError(f"unknown GGUF head {head!r} (known: {', '.join(GGUF_HEADS)})")
    plan = []
    for t in syn.tensor_plan(shape):
        if t.kind == syn.LINEAR:
            qtype = linear_type
        elif t.kind == syn.EMBEDDING:
            qtype = head.upper()
        else:
            qtype = "F32"
        plan.append((arch.gguf_name(t.name), t.kind, t.dims, qtype))
    return plan


def gguf_architecture(shape: syn.Shape) -> str:
    """The llama.cpp architecture a shape's GGUF is written as."""
    return "bitnet" if shape.sub_norms else "llama"


def _tokenizer(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """A llama (SentencePiece) style vocabulary of exactly vocab_size dummy tokens: <unk>, <s>, </s>,
    the 256 byte tokens, then "▁tN". The benchmark feeds ids, so it only has to load."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    if vocab_size < len(tokens) + 1:
        raise ValueError(f"vocab size {vocab_size} is too small for a GGUF vocabulary")
    tokens += [f"\u2581t{i}" for i in range(vocab_size - len(tokens))]
    types += [1] * (vocab_size - len(types))  # NORMAL
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(vocab_size - 259)]
    return tokens, scores, types


def write_gguf(shape: syn.Shape | str, path: str | os.PathLike, linear_type: str = "TQ2_0", head: str = "q8_0",
               seed: int = 0, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write `shape` as a llama.cpp `bitnet` GGUF to `path`, tensor by tensor (each is quantized
    right before it is written, so memory holds one tensor at a time)."""
    import gguf
    from gguf.quants import quantize

    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    plan = gguf_plan(s, linear_type, head)
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    # llama.cpp's `bitnet` graph has the sub-norms; shapes without them are its plain `llama` graph
    w = gguf.GGUFWriter(path, gguf_architecture(s))
    w.add_name(f"synthetic-{s.name}")
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_block_count(s.n_layers)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    if s.head_dim * s.n_heads != s.hidden_size:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_vocab_size(s.vocab_size)
    tokens, scores, types = _tokenizer(s.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_uint32("bitnet_run.synthetic_format", GGUF_FORMAT)
    w.add_string("bitnet_run.synthetic_shape", s.name)
    w.add_uint32("bitnet_run.synthetic_seed", seed)
    w.add_string("bitnet_run.linear_type", linear_type)
    w.add_string("bitnet_run.head", head)

    def nbytes(dims: tuple[int, ...], qtype: str) -> int:
        if qtype == "F32":
            return 4 * math.prod(dims)
        if qtype == "F16":
            return 2 * math.prod(dims)
        block, type_size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        rows, cols = dims
        if cols % block:
            raise ValueError(f"{qtype} needs rows of a multiple of {block} weights; this shape has {cols}")
        return rows * cols // block * type_size

    for name, _kind, dims, qtype in plan:
        if qtype in ("F32", "F16"):
            w.add_tensor_info(name, dims, np.dtype(np.float32 if qtype == "F32" else np.float16), nbytes(dims, qtype))
        else:
            rows, cols = dims
            n = nbytes(dims, qtype)
            w.add_tensor_info(name, (rows, n // rows), np.dtype(np.uint8), n, raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = len(plan)
    for i, (name, kind, dims, qtype) in enumerate(plan):
        if kind == syn.NORM:
            data = np.ones(dims, dtype=np.float32)
        elif kind == syn.LINEAR:
            values = rng.integers(-1, 2, size=dims, dtype=np.int8).astype(np.float32)
            values *= np.float32(1.0 / math.sqrt(dims[1] * 2.0 / 3.0))
            data = quantize(values, Q[qtype])
        else:  # embedding / head, in row chunks
            rows, cols = dims
            chunks = []
            for start in range(0, rows, syn.EMBEDDING_CHUNK_ROWS):
                stop = min(rows, start + syn.EMBEDDING_CHUNK_ROWS)
                x = rng.standard_normal((stop - start, cols), dtype=np.float32) * np.float32(syn.EMBEDDING_STD)
                chunks.append(x.astype(np.float16) if qtype == "F16" else quantize(x, Q[qtype]))
            data = np.concatenate(chunks)
        w.write_tensor_data(data)
        if progress is not None:
            progress(i + 1, total, name)
    w.close()
    return Path(path)


def _gguf_cached_ok(path: Path, shape: syn.Shape, linear_type: str, head: str, seed: int) -> bool:
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        fields = {k: reader.fields[k].contents() for k in (
            "bitnet_run.synthetic_format", "bitnet_run.synthetic_shape", "bitnet_run.synthetic_seed",
            "bitnet_run.linear_type", "bitnet_run.head") if k in reader.fields}
    except Exception:  # missing, truncated or not a GGUF: rewrite it
        return False
    return fields == {"bitnet_run.synthetic_format": GGUF_FORMAT, "bitnet_run.synthetic_shape": shape.name,
                      "bitnet_run.synthetic_seed": seed, "bitnet_run.linear_type": linear_type,
                      "bitnet_run.head": head}


def gguf_file_name(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0") -> str:
    """The cache file name: <shape>-<linear>-<head>.gguf."""
    name = shape if isinstance(shape, str) else shape.name
    return f"{name}-{linear_type.lower()}-{head}.gguf"


def cached_gguf(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0",
                cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path | None:
    """The cached GGUF of `shape` when it is there and current, else None."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    directory = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    path = directory / gguf_file_name(s, linear_type, head)
    return path if path.is_file() and _gguf_cached_ok(path, s, linear_type, head, seed) else None


def ensure_gguf(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0",
                cache_dir: str | os.PathLike | None = None, seed: int = 0,
                progress: Callable[[int, int, str], None] | None = None) -> Path:
    """The cached GGUF <cache_dir>/<shape>-<linear>-<head>.gguf, written once (atomically) if absent or stale."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    cached = cached_gguf(s, linear_type, head, cache_dir, seed)
    if cached is not None:
        return cached
    directory = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    return syn.write_atomically(directory / gguf_file_name(s, linear_type, head),
                                lambda tmp: write_gguf(s, tmp, linear_type, head, seed=seed, progress=progress))


# --------------------------------------------------------------------------- llama.cpp runner


class LlamaCppRunner:
    """One llama-cpp-python model at a thread count; pp/tg timers on token ids (Llama.eval)."""

    def __init__(self, path: str | os.PathLike, n_threads: int, n_ctx: int, n_batch: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_threads=n_threads, n_threads_batch=n_threads, n_ctx=n_ctx,
            n_batch=max(n_batch, 1), n_ubatch=max(n_batch, 1), logits_all=False, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def time_pp(self, tokens: Sequence[int]) -> float:
        self.llm.reset()
        ids = [int(t) for t in tokens]
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def time_tg(self, tokens: Sequence[int]) -> float:
        self.llm.reset()
        ids = [int(t) for t in tokens]
        start = time.perf_counter()
        for t in ids:
            self.llm.eval([t])
        return time.perf_counter() - start

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()


def time_llamacpp(path: str | os.PathLike, n_prompt: int, n_gen: int, n_threads: int, repetitions: int,
                  seed: int = 0, warmup: bool = True) -> dict[str, list[float]]:
    """Tokens/s samples of llama.cpp on a GGUF: {"pp<n_prompt>": [...], "tg<n_gen>": [...]} (a 0 length
    is skipped). One untimed warm-up run per test unless warmup=False."""
    n_ctx = max(n_prompt, n_gen, 8)
    runner = LlamaCppRunner(path, n_threads, n_ctx, max(n_prompt, 1))
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {}
    try:
        for kind, n in (("pp", n_prompt), ("tg", n_gen)):
            if n <= 0:
                continue
            tokens = rng.integers(0, runner.n_vocab, size=n)
            timer = runner.time_pp if kind == "pp" else runner.time_tg
            if warmup:
                timer(tokens if kind == "pp" else tokens[:4])
            out[f"{kind}{n}"] = [n / timer(tokens) for _ in range(repetitions)]
    finally:
        runner.close()
    return out


def gguf_facts(shape: syn.Shape | str, linear_type: str, head: str) -> dict:
    """Sizes of the GGUF of `shape` from the plan: params, bits per weight of the ternary linears,
    weight bytes one generated token reads (as bench.model_facts counts them), the linears' type
    (`weights`) and a model_type."""
    import gguf

    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    n_params = linear_bytes = linear_params = per_token = 0
    for _name, kind, dims, qtype in gguf_plan(s, linear_type, head):
        numel = math.prod(dims)
        if qtype in ("F32", "F16"):
            nb = numel * (4 if qtype == "F32" else 2)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
            nb = numel // block * type_size
        n_params += numel
        if kind == syn.LINEAR:
            linear_bytes += nb
            linear_params += numel
        if kind == syn.EMBEDDING and _name == "token_embd.weight" and not s.tied_embeddings:
            per_token += nb // dims[0]  # only the token's row
        else:
            per_token += nb
    return {
        "n_params": n_params, "linear_bpw": linear_bytes * 8 / linear_params, "bytes_per_token": per_token,
        "weights": linear_type,
        "model_type": f"bitnet {s.hidden_size}x{s.n_layers}L {'tied' if s.tied_embeddings else 'untied'} "
                      f"{linear_type} {head.upper()} head (llama.cpp {gguf_architecture(s)} graph: SiLU FFN)",
    }


def check_shape(shape: syn.Shape | str) -> None:
    """Raises ValueError (one line) when the shape's rows are not whole TQ blocks (256 weights)."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    for name, _kind, dims, qtype in gguf_plan(s):
        if qtype.startswith("TQ") and dims[1] % 256:
            raise ValueError(f"--peers llamacpp: shape {s.name} has {name} rows of {dims[1]} weights, "
                             "not a multiple of the 256 of TQ2_0/TQ1_0 blocks")
