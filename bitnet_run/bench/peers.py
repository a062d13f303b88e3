"""Peer runtimes for `bitnet-run bench --peers`: the same synthetic shape as GGUF in each peer's
format, timed interleaved with bitnet-run.

`write_gguf` writes a synthetic shape (bitnet_run/bench/synthetic.py) as a GGUF that llama.cpp-family
runtimes load: architecture `bitnet` for shapes with sub-norms
(the 1bitLLM names, which llama.cpp, bitnet.cpp and ik_llama.cpp all know), `llama` for the others, or
`bitnet-b1.58` (2B-4T's, relu2 FFN, known to bitnet.cpp's newer releases and to ik_llama.cpp), the
tensors of the shape's plan (convert/arch.py) under their llama.cpp names (arch.gguf_name:
token_embd, output_norm, blk.N.attn_q, ...); norms F32, the tied embedding (= output head) Q8_0 or F16, the linears as
TQ2_0 / TQ1_0 (llama.cpp; quantized with gguf.quants.quantize) or I2_S (bitnet.cpp's ggml type 36,
`encode_i2s`). The linears hold exactly the ternary weights of the synthetic .bnr of the same seed
(drawn by synthetic.py's own generator, in the same order), times the same one scale per tensor.
llama.cpp's `bitnet` graph gates the FFN with SiLU instead of relu2: fine for timing, meaningless
for outputs (the weights are random anyway).

ik_llama.cpp's IQ2_BN / IQ2_BN_R4 files are made by its own llama-quantize from the `bitnet-b1.58`
I2_S file (`ensure_ik_gguf`), so they hold the same ternary weights too.

Two ways to time a peer: `LlamaCppRunner` (llama.cpp through llama-cpp-python, in process, timing
only Llama.eval of token ids) and `LlamaBenchRunner` (a peer's own `llama-bench` binary, given with
`bench --peer-bin NAME=PATH`: one process per timed run, its own warm-up, its reported t/s).
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import fileformat as ff
from ..convert import arch
from . import synthetic as syn

GGUF_FORMAT = 2  # bump when the files written here change, so stale caches are rewritten
LINEAR_TYPES = ("TQ2_0", "TQ1_0")  # llama.cpp's ternary types (gguf-py quantizes them)
I2S = "I2_S"  # bitnet.cpp's (written here with encode_i2s)
WRITTEN_TYPES = LINEAR_TYPES + (I2S,)
IK_TYPES = ("IQ2_BN", "IQ2_BN_R4")  # ik_llama.cpp's, made from the I2_S file by its llama-quantize
GGUF_HEADS = ("q8_0", "f16")
ARCHITECTURES = ("bitnet", "llama", "bitnet-b1.58")

# ggml type numbers outside gguf-py's enum (bitnet.cpp's and ik_llama.cpp's forks of ggml)
GGML_TYPES = {I2S: 36, "IQ2_BN": 135, "IQ2_BN_R4": 335}
# Weights per block of each ternary type: a matrix row must be whole blocks.
ROW_BLOCK = {"TQ2_0": 256, "TQ1_0": 256, I2S: 128, "IQ2_BN": 64, "IQ2_BN_R4": 64}
# Shortest row a peer can multiply: ik_llama.cpp quantizes the activations of an IQ2_BN matmul in
# groups of 8 blocks and aborts on shorter rows (its IQ2_BN_R4 path has no such limit).
ROW_MIN = {"IQ2_BN": 512}

I2S_BLOCK = 128  # weights per I2_S block (32 bytes; bitnet.cpp's x86 layout)
I2S_TAIL = 32  # bytes after an I2_S tensor's codes: its f32 scale, then zeros
IQ2BN_ROW_META = 4  # bytes before each IQ2_BN row's codes: its f32 scale

def gguf_plan(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0") -> list[tuple[str, str, tuple[int, ...], str]]:
    """(gguf name, kind, dims as (rows, cols) like ours, ggml type name) of every tensor, in write order."""
    if linear_type not in WRITTEN_TYPES + IK_TYPES:
        raise ValueError(f"unknown linear type {linear_type!r} (known: {', '.join(WRITTEN_TYPES + IK_TYPES)})")
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


def tensor_nbytes(qtype: str, dims: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type `qtype` with dims (rows, cols) like ours (or (n,))."""
    import gguf

    n = math.prod(dims)
    if qtype in ("F32", "F16"):
        return n * (4 if qtype == "F32" else 2)
    rows, cols = dims
    if cols % ROW_BLOCK.get(qtype, 1):
        raise ValueError(f"{qtype} needs rows of a multiple of {ROW_BLOCK[qtype]} weights; this shape has {cols}")
    if qtype == I2S:
        return n // 4 + I2S_TAIL
    if qtype in IK_TYPES:
        return rows * (IQ2BN_ROW_META + cols // 4)
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if cols % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} weights; this shape has {cols}")
    return rows * cols // block * type_size


# --------------------------------------------------------------------------- I2_S


def encode_i2s(w: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp's I2_S bytes of a ternary int8 tensor (any shape; its elements in ggml order, i.e.
    row-major [rows, cols]) and its one scale: codes w+1 (0, 1, 2 = -1, 0, +1) in blocks of 128
    weights in 32 bytes, byte j of a block holding weight j in bits 7:6, j+32 in 5:4, j+64 in 3:2 and
    j+96 in 1:0; then the scale as f32 and zeros to I2S_TAIL bytes."""
    flat = np.ascontiguousarray(w, dtype=np.int8).reshape(-1)
    if flat.size % I2S_BLOCK:
        raise ValueError(f"I2_S holds whole blocks of {I2S_BLOCK} weights, not {flat.size}")
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("encode_i2s expects ternary values in {-1, 0, 1}")
    codes = (flat + 1).astype(np.uint8).reshape(-1, 4, I2S_BLOCK // 4)  # block, group (j // 32), j % 32
    out = np.zeros(flat.size // 4 + I2S_TAIL, dtype=np.uint8)
    out[: flat.size // 4] = ((codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]).reshape(-1)
    out[flat.size // 4 : flat.size // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out


def decode_i2s(data: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Inverse of encode_i2s: (int8 weights [n] in ggml order, scale) from a tensor's bytes."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if n % I2S_BLOCK or data.size != n // 4 + I2S_TAIL:
        raise ValueError(f"I2_S data of {data.size} bytes does not hold {n} weights ({n // 4 + I2S_TAIL} bytes)")
    packed = data[: n // 4].reshape(-1, 1, I2S_BLOCK // 4)
    codes = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3
    if np.any(codes == 3):
        raise ValueError("I2_S data holds the invalid code 3")
    scale = float(data[n // 4 : n // 4 + 4].view("<f4")[0])
    return codes.reshape(-1).astype(np.int8) - 1, scale


# --------------------------------------------------------------------------- writing
def gguf_architecture(shape: syn.Shape) -> str:
    """The llama.cpp architecture a shape's GGUF is written as."""
    # llama.cpp's `bitnet` graph has the sub-norms; shapes without them are its plain `llama` graph
    return "bitnet" if shape.sub_norms else "llama"


def ik_architecture(shape: syn.Shape) -> str:
    """The architecture of ik_llama.cpp's files: 2B-4T's `bitnet-b1.58` (sub-norms, relu2) where the
    shape has that layout, else gguf_architecture."""
    return "bitnet-b1.58" if shape.sub_norms and shape.hidden_act == "relu2" else gguf_architecture(shape)


def _architecture(shape: syn.Shape, architecture: str | None) -> str:
    if architecture is None:
        return gguf_architecture(shape)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown GGUF architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    return architecture


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
               seed: int = 0, progress: Callable[[int, int, str], None] | None = None,
               architecture: str | None = None) -> Path:
    """Write `shape` as a GGUF of `architecture` (default gguf_architecture(shape)) to `path`, tensor by tensor (each is encoded
    right before it is written, so memory holds one tensor at a time). The linears are the ternary
    weights and scales of the synthetic .bnr of the same seed (synthetic._random_ternary, drawn in
    the same order), the embedding the same normal draws as its bf16 / Q8_R one."""
    import gguf
    from gguf.quants import quantize

    if linear_type not in WRITTEN_TYPES:
        raise ValueError(f"write_gguf writes {', '.join(WRITTEN_TYPES)}, not {linear_type!r}")
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    architecture = _architecture(s, architecture)
    plan = gguf_plan(s, linear_type, head)
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, architecture)
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

    for name, _kind, dims, qtype in plan:
        n = tensor_nbytes(qtype, dims)
        if qtype in ("F32", "F16"):
            w.add_tensor_info(name, dims, np.dtype(np.float32 if qtype == "F32" else np.float16), n)
        elif qtype == I2S:  # not in gguf-py's enum: the type number is written as given, dims kept
            w.add_tensor_info(name, dims, np.dtype(np.int8), n, raw_dtype=GGML_TYPES[I2S])
        else:
            rows, _cols = dims
            w.add_tensor_info(name, (rows, n // rows), np.dtype(np.uint8), n, raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = len(plan)
    for i, (name, kind, dims, qtype) in enumerate(plan):
        if kind == syn.NORM:
            data = np.ones(dims, dtype=np.float32)
        elif kind == syn.LINEAR:
            ternary = syn._random_ternary(rng, dims)  # the .bnr's I2 weights and scale
            values = ff.unpack_i2(ternary.data, dims[1])
            if qtype == I2S:
                data = encode_i2s(values, ternary.scale)
            else:
                data = quantize(values.astype(np.float32) * np.float32(ternary.scale), Q[qtype])
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


# --------------------------------------------------------------------------- reading


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    fields: dict  # key -> value (arrays as lists)
    tensors: list[GGUFTensorInfo]
    data_offset: int  # file offset of the data section

    def tensor_data(self, path: str | os.PathLike, name: str, nbytes: int) -> np.ndarray:
        t = next(t for t in self.tensors if t.name == name)
        return np.fromfile(path, dtype=np.uint8, count=nbytes, offset=self.data_offset + t.offset)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The key/values and tensor table of a GGUF (v2/v3, little-endian), whatever its tensor types:
    gguf.GGUFReader stops at type numbers outside gguf-py's enum, such as I2_S's 36."""
    with open(path, "rb") as f:
        buf = f.read(1 << 20)
        pos = 0

        def need(n: int) -> None:
            nonlocal buf
            while pos + n > len(buf):
                more = f.read(max(1 << 20, n))
                if not more:
                    raise ValueError(f"{path}: truncated GGUF header")
                buf += more

        def scalar(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            need(size)
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += size
            return v

        def string() -> str:
            nonlocal pos
            n = scalar("<Q")
            need(n)
            v = buf[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
            return v

        def value(vtype: int):
            if vtype in _GGUF_SCALARS:
                return scalar(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY:
                item_type, count = scalar("<I"), scalar("<Q")
                return [value(item_type) for _ in range(count)]
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        need(4)
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        pos = 4
        version = scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = scalar("<Q"), scalar("<Q")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(scalar("<Q") for _ in range(scalar("<I")))
            tensors.append(GGUFTensorInfo(name, dims, scalar("<I"), scalar("<Q")))
    alignment = int(fields.get("general.alignment", 32))
    return GGUFHeader(fields, tensors, (pos + alignment - 1) // alignment * alignment)


# --------------------------------------------------------------------------- the cache


def _gguf_cached_ok(path: Path, shape: syn.Shape, linear_type: str, head: str, seed: int, architecture: str) -> bool:
    try:
        fields = read_gguf_header(path).fields
    except (OSError, ValueError, struct.error):  # missing, truncated or not a GGUF: rewrite it
        return False
    want = {"general.architecture": architecture, "bitnet_run.synthetic_format": GGUF_FORMAT,
            "bitnet_run.synthetic_shape": shape.name, "bitnet_run.synthetic_seed": seed,
            "bitnet_run.linear_type": linear_type, "bitnet_run.head": head}
    return all(fields.get(k) == v for k, v in want.items())


def gguf_file_name(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0",
                   architecture: str | None = None) -> str:
    """The cache file name: <shape>-<linear>-<head>[-<architecture>].gguf (the architecture only when
    not the shape's gguf_architecture)."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    architecture = _architecture(s, architecture)
    suffix = "" if architecture == gguf_architecture(s) else f"-{architecture}"
    return f"{s.name}-{linear_type.lower()}-{head}{suffix}.gguf"


def cached_gguf(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0",
                cache_dir: str | os.PathLike | None = None, seed: int = 0, architecture: str | None = None) -> Path | None:
    """The cached GGUF of `shape` when it is there and current, else None."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    directory = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    path = directory / gguf_file_name(s, linear_type, head, architecture)
    return path if path.is_file() and _gguf_cached_ok(path, s, linear_type, head, seed,
                                                      _architecture(s, architecture)) else None


def ensure_gguf(shape: syn.Shape | str, linear_type: str = "TQ2_0", head: str = "q8_0",
                cache_dir: str | os.PathLike | None = None, seed: int = 0,
                progress: Callable[[int, int, str], None] | None = None, architecture: str | None = None) -> Path:
    """The cached GGUF <cache_dir>/<gguf_file_name>, written once (atomically) if absent or stale."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    cached = cached_gguf(s, linear_type, head, cache_dir, seed, architecture)
    if cached is not None:
        return cached
    directory = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    return syn.write_atomically(directory / gguf_file_name(s, linear_type, head, architecture),
                                lambda tmp: write_gguf(s, tmp, linear_type, head, seed=seed, progress=progress,
                                                       architecture=architecture))


_FAILURE_WORDS = ("error", "failed")  # ggml's failed assertions: "GGML_ASSERT(...) failed"


def failure_line(proc: subprocess.CompletedProcess) -> str:
    """The line of a failed peer process that says why: its last stderr (else stdout) line naming an
    error or a failure, else its last line (ggml follows a failed assertion with a debugger's stack
    dump, whose last line says nothing)."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    named = [line for line in lines if any(w in line.lower() for w in _FAILURE_WORDS)]
    return (named or lines or ["no output"])[-1]


def ensure_ik_gguf(shape: syn.Shape | str, ik_type: str, head: str, quantize: str | os.PathLike,
                   cache_dir: str | os.PathLike | None = None, seed: int = 0,
                   progress: Callable[[int, int, str], None] | None = None) -> Path:
    """The cached ik_llama.cpp GGUF <shape>-<iq2_bn|iq2_bn_r4>-<head>.gguf: ik_llama.cpp's own
    llama-quantize (`quantize`) run once on the I2_S file of architecture ik_architecture(shape)
    (written first if needed), the head kept in its type, the linear type recorded in bitnet_run.linear_type."""
    if ik_type not in IK_TYPES:
        raise ValueError(f"unknown ik_llama.cpp type {ik_type!r} (known: {', '.join(IK_TYPES)})")
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    architecture = ik_architecture(s)
    cached = cached_gguf(s, ik_type, head, cache_dir, seed, architecture)
    if cached is not None:
        return cached
    source = ensure_gguf(s, I2S, head, cache_dir, seed, progress, architecture=architecture)

    def run_quantize(tmp: Path) -> None:
        command = [str(quantize), "--allow-requantize", "--token-embedding-type", head,
                   "--override-kv", f"bitnet_run.linear_type=str:{ik_type}", str(source), str(tmp), ik_type]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{quantize} {ik_type} failed (exit status {proc.returncode}): {failure_line(proc)}")

    directory = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    return syn.write_atomically(directory / gguf_file_name(s, ik_type, head, architecture), run_quantize)


# --------------------------------------------------------------------------- llama.cpp runner


def import_llama_cpp():
    """llama-cpp-python, loaded in-process with OpenMP's passive wait policy: its threads then sleep
    between evaluations instead of spinning on the cores that bitnet-run's threads run on next (the
    runs are interleaved). Within an evaluation ggml synchronizes its threads with its own barrier,
    so this costs it one thread wake-up per evaluation. Raises ImportError when it is not installed."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when libgomp loads
    import llama_cpp

    return llama_cpp


class LlamaCppRunner:
    """One llama-cpp-python model at a thread count; pp/tg timers on token ids (Llama.eval)."""

    def __init__(self, path: str | os.PathLike, n_threads: int, n_ctx: int, n_batch: int):
        llama_cpp = import_llama_cpp()
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


def gguf_facts(shape: syn.Shape | str, linear_type: str, head: str, architecture: str | None = None) -> dict:
    """Sizes of the GGUF of `shape` from the plan: params, bits per weight of the ternary linears,
    weight bytes one generated token reads (as bench.model_facts counts them), the linears' type
    (`weights`) and a model_type."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    architecture = _architecture(s, architecture)
    n_params = linear_bytes = linear_params = per_token = 0
    for _name, kind, dims, qtype in gguf_plan(s, linear_type, head):
        numel = math.prod(dims)
        nb = tensor_nbytes(qtype, dims)
        n_params += numel
        if kind == syn.LINEAR:
            linear_bytes += nb
            linear_params += numel
        if kind == syn.EMBEDDING and _name == "token_embd.weight" and not s.tied_embeddings:
            per_token += nb // dims[0]  # only the token's row
        else:
            per_token += nb
    graph = "relu2 FFN" if architecture == "bitnet-b1.58" else "SiLU FFN"
    return {
        "n_params": n_params, "linear_bpw": linear_bytes * 8 / linear_params, "bytes_per_token": per_token,
        "weights": linear_type,
        "model_type": f"{architecture} {s.hidden_size}x{s.n_layers}L {'tied' if s.tied_embeddings else 'untied'} "
                      f"{linear_type} {head.upper()} head ({graph})",
    }


def check_shape(shape: syn.Shape | str, linear_types: Sequence[str] = LINEAR_TYPES, what: str = "--peers llamacpp") -> None:
    """Raises ValueError (one line) when the shape's matrix rows are not whole blocks of each of
    `linear_types` (TQ2_0/TQ1_0: 256 weights, I2_S: 128, IQ2_BN: 64) or shorter than ROW_MIN."""
    s = syn.get_shape(shape) if isinstance(shape, str) else shape
    for qtype in linear_types:
        for name, kind, dims, _ in gguf_plan(s, qtype):
            if kind != syn.LINEAR:
                continue
            if dims[1] % ROW_BLOCK[qtype]:
                raise ValueError(f"{what}: shape {s.name} has {name} rows of {dims[1]} weights, "
                                 f"not a multiple of the {ROW_BLOCK[qtype]} of {qtype} blocks")
            if dims[1] < ROW_MIN.get(qtype, 0):
                raise ValueError(f"{what}: shape {s.name} has {name} rows of {dims[1]} weights; "
                                 f"{qtype} needs rows of at least {ROW_MIN[qtype]}")


# --------------------------------------------------------------------------- a peer's own llama-bench


def llama_bench_command(binary: str | os.PathLike, path: str | os.PathLike, n_prompt: int, n_gen: int,
                        n_threads: int) -> list[str]:
    """One llama-bench run of one test (ppN: -p N -n 0; tgN: -p 0 -n N), one timed repetition after
    llama-bench's own warm-up, a JSON array on stdout (`-o json`: ik_llama.cpp's llama-bench has no
    `jsonl`). Everything else is the peer's default (batch sizes, flash attention, mmap), as its
    users would run it."""
    return [str(binary), "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(n_threads),
            "-r", "1", "-o", "json"]


def parse_llama_bench_output(text: str, n_prompt: int, n_gen: int) -> dict:
    """The result of the test (n_prompt, n_gen) in llama-bench's `-o json` (or `-o jsonl`) output,
    whatever lines come before it: {"seconds": mean seconds of a timed run, "tokens_per_second",
    "version": "build <commit> (<number>)"}. Raises ValueError (one line) when the output holds no
    such test."""
    entries = []
    lines = text.strip().splitlines()
    array_start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), None)
    if array_start is not None:  # -o json: one array, from its first line to the end
        try:
            entries = json.loads("\n".join(lines[array_start:]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"llama-bench output is not JSON: {exc}") from None
    else:
        for line in lines:
            line = line.strip()
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"llama-bench output line is not JSON: {exc}") from None
    for e in entries:
        if not isinstance(e, dict) or e.get("n_prompt") != n_prompt or e.get("n_gen") != n_gen:
            continue
        avg_ns = e.get("avg_ns")
        if not isinstance(avg_ns, (int, float)) or avg_ns <= 0:
            raise ValueError(f"llama-bench result of p={n_prompt} n={n_gen} has no positive avg_ns: {avg_ns!r}")
        n = n_prompt + n_gen
        return {"seconds": avg_ns / 1e9, "tokens_per_second": n / (avg_ns / 1e9),
                "version": f"build {e.get('build_commit', '?')} ({e.get('build_number', '?')})"}
    raise ValueError(f"llama-bench printed no result for p={n_prompt} n={n_gen}")


class LlamaBenchRunner:
    """A peer's own llama-bench binary on one GGUF at one thread count, behind the timer interface of
    LlamaCppRunner (time_pp, time_tg, n_vocab, close). Each timed run is one llama-bench process:
    it loads the (page-cached, mapped) file, runs its own untimed warm-up, then one timed run of the
    test, and reports its duration; llama-bench draws its own random tokens, so only the number of
    token ids given here matters."""

    def __init__(self, binary: str | os.PathLike, path: str | os.PathLike, n_threads: int):
        self.binary, self.path, self.n_threads = Path(binary), Path(path), n_threads
        fields = read_gguf_header(self.path).fields
        self.n_vocab = int(fields[f"{fields['general.architecture']}.vocab_size"])
        self.version: str | None = None

    def _seconds(self, n_prompt: int, n_gen: int) -> float:
        command = llama_bench_command(self.binary, self.path, n_prompt, n_gen, self.n_threads)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.binary} on {self.path.name} failed (exit status {proc.returncode}): "
                               f"{failure_line(proc)}")
        try:
            result = parse_llama_bench_output(proc.stdout, n_prompt, n_gen)
        except ValueError as exc:
            raise RuntimeError(f"{self.binary} on {self.path.name}: {exc}") from None
        self.version = f"llama-bench {result['version']} at {self.binary}"
        return result["seconds"]

    def time_pp(self, tokens: Sequence[int]) -> float:
        return self._seconds(len(tokens), 0)

    def time_tg(self, tokens: Sequence[int]) -> float:
        return self._seconds(0, len(tokens))

    def close(self) -> None:
        pass
