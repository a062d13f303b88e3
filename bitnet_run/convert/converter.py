"""convert_checkpoint: one Hugging Face BitNet checkpoint in, one .bnr file out."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bitnet_run import __version__
from bitnet_run import fileformat as ff

from . import arch
from .checkpoint import Checkpoint
from .hub import resolve_source
from .tensors import add_tensors
from .tokenizer import add_tokenizer_metadata

MODEL_SUFFIX = ".bnr"


WEIGHT_ENCODINGS = tuple(ff.WEIGHT_ENCODINGS)  # ("i2", "tl1", "tl2")
HEAD_ENCODINGS = tuple(ff.HEAD_ENCODINGS)  # ("bf16", "f16", "f32", "q8", "q6", "q4")


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    progress: Callable[[int, int, str], None] | None = None,
    weights: str = "i2",
    head: str | None = None,
) -> Path:
    """Convert `src` (a checkpoint directory or a hub repo id) into the model file `out`.

    `weights` is the encoding of the ternary linears (docs/format.md): "i2" (2 bits/weight, the
    default), "tl1" (lookup-table pairs, 2 bits/weight) or "tl2" (lookup-table triples, 1.67 bits/weight).
    `head` is the encoding of the output head (the tied embedding, else lm_head): "bf16", "f16",
    "f32", "q8" (Q8_R: per-row absmax int8 with an f32 scale per row, about half the bytes of
    bf16), "q6" or "q4" (Q6_B, Q4_B: 6- or 4-bit values in blocks of 32 columns with a u8 scale
    per block and an f32 scale per row, 6.25 or 4.25 bits per weight); None (the default) keeps
    the checkpoint's dtype.
    The file does not depend on the machine that converts it.

    When `out` is an existing directory the file is named after the checkpoint inside it.
    `progress(done, total, name)` is called after each tensor is written. Raises ConversionError
    for a checkpoint it does not understand; nothing is left at `out` when conversion fails.
    Returns the path written.
    """
    check_encodings(weights, head)
    directory, source = resolve_source(src)
    name = source.rstrip("/").split("/")[-1]
    checkpoint = Checkpoint(directory)
    family, hp, linears = arch.read_config(checkpoint.config)

    writer = ff.Writer()
    writer.add_string("general.architecture", arch.ARCHITECTURE)
    writer.add_string("general.name", name)
    writer.add_string("general.source", source)
    writer.add_string("general.converter", f"bitnet-run {__version__}")
    arch.add_hyperparameters(writer, hp)
    add_tokenizer_metadata(writer, checkpoint, hp.vocab_size)
    add_tensors(writer, checkpoint, family, hp, linears, weights, head)

    return write_model(writer, out, name, progress)


def check_encodings(weights: str, head: str | None) -> None:
    if weights not in ff.WEIGHT_ENCODINGS:
        raise ValueError(f"weights must be one of {WEIGHT_ENCODINGS}, got {weights!r}")
    if head is not None and head not in ff.HEAD_ENCODINGS:
        raise ValueError(f"head must be one of {HEAD_ENCODINGS} or None, got {head!r}")


def write_model(writer: ff.Writer, out: str | Path, name: str,
                progress: Callable[[int, int, str], None] | None = None) -> Path:
    """writer.write into `out` (or `out`/<name>.bnr when `out` is a directory) atomically."""
    out = Path(out)
    if out.is_dir():
        out = out / (name + MODEL_SUFFIX)
    # Written beside the target and renamed into place, so a failure never leaves a partial file.
    # (A plain name rather than mkstemp, whose 0600 mode would carry over to the model file.)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        writer.write(tmp, progress)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
