"""Synthetic models for benchmarking: random ternary weights of a real model's exact shape, written
straight from numpy into a packed .bnr file (no download, no torch) and cached.

The weights are meaningless (the text they generate is noise) but every tensor has the shape,
encoding and size of the real model, so the runtime does exactly the work it does for the real one.
The ternary linears can be written in any of the file format's encodings (I2, TL1, TL2); for one
seed every encoding holds the same weights, so files that differ only in encoding are the same model.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from .. import fileformat as ff
from ..convert import arch
from ..convert.arch import Hyperparameters

SYNTHETIC_FORMAT = 1  # bump when the files written here change, so stale caches are rewritten
EMBEDDING_STD = 0.02
EMBEDDING_CHUNK_ROWS = 4096
# Rows re-encoded at a time from I2 to TL1/TL2: a whole number of TL tiles, and tens of MB of
# temporaries on the widest matrix (8b's 14336 columns) instead of GBs for the whole matrix.
TERNARY_CHUNK_ROWS = 32 * ff.TL_TILE


@dataclass(frozen=True)
class Shape:
    """One synthetic model: a name, the hyperparameters of the released model it copies, and where
    they come from."""

    name: str
    hp: Hyperparameters
    description: str

    def __getattr__(self, name: str):  # the dimensions read like the hyperparameters (shape.hidden_size)
        return getattr(self.__dict__["hp"], name)


def make_shape(name: str, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           tied: bool, context: int, rope_theta: float, description: str, head_dim: int | None = None,
           rms_norm_eps: float = 1e-5, hidden_act: str = "relu2", sub_norms: bool = True,
           weight_scale: str = "multiply") -> Shape:
    hp = Hyperparameters(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim or hidden // heads, context,
                         rms_norm_eps, rope_theta, hidden_act, tied, sub_norms, None, weight_scale)
    return Shape(name, hp, description)


def make_llama_shape(name: str, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           tied: bool, context: int, rope_theta: float, description: str, head_dim: int | None = None,
           rms_norm_eps: float = 1e-6) -> Shape:
    """A Llama-architecture BitLinear model (SiLU, no sub-norms, inverted weight scale)."""
    return make_shape(name, vocab, hidden, intermediate, layers, heads, kv_heads, tied, context, rope_theta, description,
                  head_dim, rms_norm_eps, "silu", False, "divide")


# The dimensions and layouts of released ternary models (docs/models.md). large-700m, 3b and 8b are
# the older relu2 + sub-norm stand-ins of the same matrices, kept so earlier results stay comparable;
# bitnet-3b, llama3-8b-1.58 and the falcon shapes have the released layouts.
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        make_shape("tiny", 1024, 256, 688, 2, 4, 2, True, 512, 500000.0, "tiny test shape for CI smoke runs"),
        # every matrix row (256 or 768 weights) is whole 256-weight GGUF TQ2_0/TQ1_0 blocks, so
        # `--peers llamacpp` can be smoke-tested on it (tiny's 688-wide FFN rows cannot)
        make_shape("tiny-tq", 1024, 256, 768, 2, 4, 2, True, 512, 500000.0,
               "tiny test shape whose rows are whole GGUF TQ blocks, for CI smoke runs with peers"),
        make_shape("large-700m", 32002, 1536, 4096, 24, 16, 16, True, 2048, 10000.0,
               "1bitLLM/bitnet_b1_58-large dimensions"),
        make_shape("2b-4t", 128256, 2560, 6912, 30, 20, 5, True, 4096, 500000.0, "microsoft/bitnet-b1.58-2B-4T"),
        make_shape("3b", 32002, 3200, 8640, 26, 32, 32, True, 2048, 10000.0, "1bitLLM/bitnet_b1_58-3B dimensions"),
        make_shape("8b", 128256, 4096, 14336, 32, 32, 8, False, 8192, 500000.0,
               "HF1BitLLM/Llama3-8B-1.58-100B-tokens dimensions"),
        make_shape("bitnet-3b", 32002, 3200, 8640, 26, 32, 32, True, 2048, 10000.0,
               "1bitLLM/bitnet_b1_58-3B (SiLU, sub-norms, head_dim 100)", hidden_act="silu"),
        make_llama_shape("llama3-8b-1.58", 128256, 4096, 14336, 32, 32, 8, False, 8192, 500000.0,
               "HF1BitLLM/Llama3-8B-1.58-100B-tokens (untied, SiLU)", rms_norm_eps=1e-5),
        make_llama_shape("falcon3-1b", 131072, 2048, 8192, 18, 8, 4, False, 8192, 1000042.0,
               "tiiuae/Falcon3-1B-Instruct-1.58bit", head_dim=256),
        make_llama_shape("falcon3-3b", 131072, 3072, 9216, 22, 12, 4, False, 32768, 1000042.0,
               "tiiuae/Falcon3-3B-Instruct-1.58bit", head_dim=256),
        make_llama_shape("falcon3-7b", 131072, 3072, 23040, 28, 12, 4, False, 32768, 1000042.0,
                         "tiiuae/Falcon3-7B-Instruct-1.58bit", head_dim=256),
        make_llama_shape("falcon3-10b", 131072, 3072, 23040, 40, 12, 4, False, 32768, 1000042.0,
               "tiiuae/Falcon3-10B-Instruct-1.58bit", head_dim=256),
        # approximate: dimensions not checked against the released config.json
        make_llama_shape("falcon-e-3b", 32768, 2304, 9216, 32, 9, 3, False, 32768, 1000042.0,
                         "tiiuae/Falcon-E-3B-Instruct (approximate dimensions)", head_dim=256),
    )
}

EMBEDDING, NORM, LINEAR = arch.EMBEDDING, arch.NORM, arch.LINEAR


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    kind: str  # EMBEDDING, NORM or LINEAR
    encoding: int
    dims: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return ff.encoded_nbytes(self.encoding, self.dims)


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown synthetic shape {name!r} (known: {', '.join(SHAPES)})") from None


HEADS = ("bf16", "q8", "q6", "q4")  # output head encodings a synthetic file can have
WEIGHTS = tuple(ff.WEIGHT_ENCODINGS)  # ternary linear encodings a synthetic file can have: i2, tl1, tl2


def tensor_plan(shape: Shape | str, head: str = "bf16", weights: str = "i2") -> list[PlannedTensor]:
    """Every tensor of the file in write order (docs/format.md), without writing anything. `head`:
    "bf16", "q8" (Q8_R), "q6" (Q6_B) or "q4" (Q4_B), the encoding of the output head (the tied
    embedding, else lm_head);
    `weights`: "i2", "tl1" or "tl2", the encoding of the ternary linears."""
    if head not in HEADS:
        raise ValueError(f"unknown synthetic head {head!r} (known: {', '.join(HEADS)})")
    if weights not in WEIGHTS:
        raise ValueError(f"unknown synthetic weight encoding {weights!r} (known: {', '.join(WEIGHTS)})")
    s = get_shape(shape) if isinstance(shape, str) else shape
    head_enc = ff.HEAD_ENCODINGS[head]
    encodings = {NORM: ff.ENCODING_F32, LINEAR: ff.WEIGHT_ENCODINGS[weights]}
    plan = []
    for t in arch.tensor_plan(s.hp):
        # the head in `head`; an untied embedding stays bf16 (only one row of it is read per token)
        encoding = head_enc if t.name == arch.head_name(s.hp) else encodings.get(t.kind, ff.ENCODING_BF16)
        plan.append(PlannedTensor(t.name, t.kind, encoding, t.shape))
    return plan


def plan_summary(shape: Shape | str, weights: str = "i2") -> dict:
    """Parameter counts and data bytes of a shape with `weights`-encoded linears, from the plan alone."""
    plan = tensor_plan(shape, weights=weights)
    linear = [t for t in plan if t.kind == LINEAR]
    return {
        "params": sum(t.numel for t in plan),
        "linear_params": sum(t.numel for t in linear),
        "embedding_params": sum(t.numel for t in plan if t.kind == EMBEDDING),
        "data_bytes": sum(t.nbytes for t in plan),
        "linear_bytes": sum(t.nbytes for t in linear),
    }


# --------------------------------------------------------------------------- tensor producers

# The 81 bytes whose four 2-bit codes are all valid (0, 1, 2 = w+1): a uniform pick among them is
# four independent uniform ternary weights, already packed.
_VALID_I2_BYTES = np.array(
    [a | (b << 2) | (c << 4) | (d << 6) for d in range(3) for c in range(3) for b in range(3) for a in range(3)],
    dtype=np.uint8,
)


def _random_i2(rng: np.random.Generator, dims: tuple[int, int]) -> np.ndarray:
    """Uniform random ternary weights [out, in], I2-packed."""
    out_features, in_features = dims
    if in_features % 4 == 0:
        return _VALID_I2_BYTES[rng.integers(0, 81, size=(out_features, in_features // 4), dtype=np.uint8)]
    return ff.pack_i2(rng.integers(-1, 2, size=dims, dtype=np.int8))


def _reencode_i2(i2: np.ndarray, dims: tuple[int, int], encoding: int) -> np.ndarray:
    """The same ternary matrix in another encoding, converted TERNARY_CHUNK_ROWS rows at a time so
    that the int8 weights of a large matrix are never all in memory. TL1/TL2 lay out whole tiles of
    rows one after another, so the encodings of consecutive tile-aligned row blocks concatenate."""
    rows, cols = dims
    pack = ff.TERNARY_PACKERS[encoding]
    out = np.empty(ff.encoded_nbytes(encoding, dims), dtype=np.uint8)
    offset = 0
    for start in range(0, rows, TERNARY_CHUNK_ROWS):
        chunk = pack(ff.unpack_i2(i2[start : start + TERNARY_CHUNK_ROWS], cols)).reshape(-1)
        out[offset : offset + chunk.size] = chunk
        offset += chunk.size
    return out


def _random_ternary(rng: np.random.Generator, dims: tuple[int, int], encoding: int = ff.ENCODING_I2) -> ff.TensorData:
    """Uniform random ternary weights in `encoding`. They are always drawn as I2 first, so a seed gives
    the same weights (and leaves the generator in the same state) whatever the encoding."""
    packed = _random_i2(rng, dims)
    if encoding != ff.ENCODING_I2:
        packed = _reencode_i2(packed, dims, encoding)
    # keeps activations near unit scale through the layers (2/3 of random ternary weights are nonzero)
    return ff.TensorData(packed, 1.0 / math.sqrt(dims[1] * 2.0 / 3.0))


def _random_bf16(rng: np.random.Generator, dims: tuple[int, int]) -> ff.TensorData:
    """Normal(0, EMBEDDING_STD) rounded to bf16 (round half to even), generated in row chunks."""
    rows, cols = dims
    out = np.empty((rows, cols), dtype=np.uint16)
    for start in range(0, rows, EMBEDDING_CHUNK_ROWS):
        stop = min(rows, start + EMBEDDING_CHUNK_ROWS)
        bits = (rng.standard_normal((stop - start, cols), dtype=np.float32) * np.float32(EMBEDDING_STD)).view(np.uint32)
        out[start:stop] = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return ff.TensorData(out)


def _random_quant(rng: np.random.Generator, dims: tuple[int, int], encoding: int) -> ff.TensorData:
    """Normal(0, EMBEDDING_STD) quantized to an integer head encoding (Q8_R, Q6_B, Q4_B), generated in row
    chunks. Every such layout is the row scales, then the rows: each chunk's two parts are gathered."""
    rows, cols = dims
    quantize = ff.ENCODINGS[encoding].quantize
    scales, body = [], []
    for start in range(0, rows, EMBEDDING_CHUNK_ROWS):
        stop = min(rows, start + EMBEDDING_CHUNK_ROWS)
        w = rng.standard_normal((stop - start, cols), dtype=np.float32) * np.float32(EMBEDDING_STD)
        packed = quantize(w)
        scales.append(packed[: 4 * (stop - start)])
        body.append(packed[4 * (stop - start):])
    return ff.TensorData(np.concatenate(scales + body))


def _producer(t: PlannedTensor, rng: np.random.Generator) -> Callable[[], ff.TensorData]:
    if t.kind == LINEAR:
        return lambda: _random_ternary(rng, t.dims, t.encoding)
    if t.kind == EMBEDDING and t.encoding in ff.QUANT_ENCODINGS:
        return lambda: _random_quant(rng, t.dims, t.encoding)
    if t.kind == EMBEDDING:
        return lambda: _random_bf16(rng, t.dims)
    return lambda: ff.TensorData(np.ones(t.dims, dtype=np.float32))


# --------------------------------------------------------------------------- tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def tokenizer_json() -> str:
    """A small valid tokenizer.json (word level over 256 byte-ish words + specials). The benchmark
    feeds token ids directly, so the tokenizer only has to load; ids stay below every shape's vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1, "<unk>": 2}
    for i in range(253):
        vocab[f"w{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str()


# --------------------------------------------------------------------------- writing and the cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitnet-run" / "synthetic"


def write_synthetic(shape: Shape | str, path: str | os.PathLike, seed: int = 0,
                    progress: Callable[[int, int, str], None] | None = None, head: str = "bf16",
                    weights: str = "i2") -> Path:
    """Write a random ternary model of `shape` to `path` (streamed tensor by tensor), its output
    head in `head` encoding ("bf16", "q8", "q6" or "q4"), its linears in `weights` encoding ("i2", "tl1", "tl2")."""
    s = get_shape(shape) if isinstance(shape, str) else shape
    rng = np.random.default_rng(seed)
    w = ff.Writer()
    w.add_string("general.architecture", arch.ARCHITECTURE)
    w.add_string("general.name", f"synthetic-{s.name}")
    w.add_string("general.source", f"synthetic random ternary weights, shape {s.name} ({s.description}), seed {seed}")
    w.add_string("general.converter", f"bitnet-run {__version__}")
    arch.add_hyperparameters(w, s.hp)
    w.add_string("tokenizer.json", tokenizer_json())
    w.add_string("tokenizer.chat_template", "")
    w.add_i32("tokenizer.bos_id", 0)
    w.add_i32("tokenizer.eos_id", 1)
    w.add_i32_array("tokenizer.stop_ids", [1])
    w.add_u32("tokenizer.add_bos", 1)
    w.add_string("synthetic.shape", s.name)
    w.add_u32("synthetic.format", SYNTHETIC_FORMAT)
    w.add_u32("synthetic.seed", seed)
    # written only when not the default, so that files written before these keys existed stay current
    if head != "bf16":
        w.add_string("synthetic.head", head)
    if weights != "i2":
        w.add_string("synthetic.weights", weights)
    for t in tensor_plan(s, head, weights):
        w.add_tensor(t.name, t.encoding, t.dims, _producer(t, rng))
    w.write(path, progress=progress)
    return Path(path)


def _cached_ok(path: Path, shape: Shape, seed: int, head: str = "bf16", weights: str = "i2") -> bool:
    try:
        header = ff.read_header(path)
    except ValueError:
        return False
    meta = header.metadata
    return (meta.get("synthetic.shape") == shape.name and meta.get("synthetic.format") == SYNTHETIC_FORMAT
            and meta.get("synthetic.seed") == seed and meta.get("synthetic.head", "bf16") == head
            and meta.get("synthetic.weights", "i2") == weights)


def file_name(shape: Shape | str, head: str = "bf16", weights: str = "i2") -> str:
    """The cache file name: <shape>[-<weights>][-<head>].bnr, each part only when not the default
    (i2, bf16), so 2b-4t.bnr, 2b-4t-q8.bnr, 2b-4t-tl1.bnr, 2b-4t-tl2-q8.bnr."""
    parts = [shape if isinstance(shape, str) else shape.name]
    if weights != "i2":
        parts.append(weights)
    if head != "bf16":
        parts.append(head)
    return "-".join(parts) + ".bnr"


def cached_path(shape: Shape | str, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                head: str = "bf16", weights: str = "i2") -> Path | None:
    """The cached file of `shape` (with a `head` output head and `weights` linears) when it is there
    and current, else None."""
    s = get_shape(shape) if isinstance(shape, str) else shape
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / file_name(s, head, weights)
    return path if path.is_file() and _cached_ok(path, s, seed, head, weights) else None


def ensure_synthetic(shape: Shape | str, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                     progress: Callable[[int, int, str], None] | None = None, head: str = "bf16",
                     weights: str = "i2") -> Path:
    """The cached file of `shape` (<cache_dir>/<file_name(shape, head, weights)>), written once if
    absent or stale. The file appears atomically (written under a temporary name, then renamed)."""
    s = get_shape(shape) if isinstance(shape, str) else shape
    cached = cached_path(s, cache_dir, seed, head, weights)
    if cached is not None:
        return cached
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return write_atomically(directory / file_name(s, head, weights),
                            lambda tmp: write_synthetic(s, tmp, seed=seed, progress=progress, head=head, weights=weights))


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Calls write(tmp) with a temporary name next to `path`, then renames it to `path`: a reader of
    the cache never sees a half-written file, and a failed write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
