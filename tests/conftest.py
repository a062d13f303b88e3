"""Shared fixtures: tiny checkpoints in the released formats, converted and loaded on both sides."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the checkpoint builders in tests/checkpoints.py

INTERMEDIATE = {128: 344, 256: 688}  # multiples of 4 (packing), not of 8 or 3


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Builds (once per argument set) a tiny random checkpoint, converts it, and loads our Model and
    the transformers reference on it."""
    from bitnet_run import Model
    from bitnet_run.convert import convert_checkpoint
    from bitnet_run.fileformat import HEAD_ENCODINGS
    from checkpoints import (load_reference, make_config, use_quant_head, write_llama_checkpoint, write_master_checkpoint,
                             write_packed_checkpoint)

    built = {}

    def build(fmt: str, hidden: int, heads: int, kv_heads: int, tied: bool, seed: int, layers: int = 2,
              weights: str = "i2", arch: str = "bitnet", head_dim: int | None = None, use_rms_norm: bool = False,
              head: str | None = None):
        """weights: the converter's ternary encoding (i2, tl1, tl2); head: its output head encoding (None:
        the checkpoint's; "q8", "q6", "q4": Q8_R, Q6_B, Q4_B, the reference's head then computing the same
        integer head);
        arch: "bitnet" (BitNetForCausalLM) or "llama" (LlamaForCausalLM with BitLinears)."""
        key = (fmt, hidden, heads, kv_heads, tied, seed, layers, weights, arch, head_dim, use_rms_norm, head)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{arch}-{fmt}-{hidden}-{heads}-{kv_heads}-{int(tied)}-{seed}-{weights}")
            shape = dict(hidden=hidden, intermediate=INTERMEDIATE[hidden], layers=layers, heads=heads,
                         kv_heads=kv_heads, tied=tied)
            if arch == "llama":
                write_llama_checkpoint(root / "hf", make_config(arch="llama", head_dim=head_dim, **shape), seed,
                                       packed=fmt == "packed", use_rms_norm=use_rms_norm)
            else:
                writer = write_packed_checkpoint if fmt == "packed" else write_master_checkpoint
                writer(root / "hf", make_config(**shape), seed)
            path = convert_checkpoint(root / "hf", root / "model.bnr", weights=weights, head=head)
            reference = load_reference(root / "hf")
            if head in ("q8", "q6", "q4"):
                use_quant_head(reference, HEAD_ENCODINGS[head])
            built[key] = SimpleNamespace(
                model=Model(path, n_threads=2), reference=reference, seed=seed, checkpoint=root / "hf", path=path,
            )
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory):
    """One small packed model for API, CLI and error tests."""
    return tiny_model_factory(fmt="packed", hidden=128, heads=4, kv_heads=2, tied=True, seed=7)
