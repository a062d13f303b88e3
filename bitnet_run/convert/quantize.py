"""Ternary weights from the two released forms: transformers' packed uint8 and float master weights."""
from __future__ import annotations

import numpy as np

# transformers' pack_weights puts 4 ternary values in a byte.
VALUES_PER_BYTE = 4


def unpack_transformers_ternary(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] in transformers' pack_weights layout -> int8 [out, in].

    With R = out/4, byte [r, c] holds W[i*R + r, c] + 1 in bits 2i..2i+1: the output rows are four
    contiguous blocks, not interleaved. Code 3 never comes out of pack_weights, so it is an error.
    """
    blocks = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    codes = np.concatenate(blocks, axis=0)
    if np.any(codes == 3):
        raise ValueError("packed weight holds the invalid code 3")
    return codes.astype(np.int8) - 1


def absmean_ternary(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Quantize a float master weight the way transformers' WeightQuant does, in float32.

    g = 1 / max(mean|W|, 1e-5); w = clamp(round_half_even(W * g), -1, 1); returns (w, 1/g), the
    scale that makes w * scale the dequantized weight.

    The mean is numpy's float32 pairwise sum divided by the count. torch's own float32 sum uses a
    different order that depends on SIMD width, thread count and torch.compile, so no summation
    reproduces it everywhere; this one agrees to the last bit or within an ulp, which moves a
    weight only if W * g lies within an ulp of a rounding tie.
    """
    weight = np.asarray(weight, dtype=np.float32)
    mean = np.mean(np.abs(weight), dtype=np.float32)
    gain = np.float32(1.0) / np.maximum(mean, np.float32(1e-5))
    ternary = np.clip(np.rint(weight * gain), -1, 1).astype(np.int8)
    return ternary, float(np.float32(1.0) / gain)


def pack_transformers_ternary(ternary: np.ndarray) -> np.ndarray:
    """Inverse of unpack_transformers_ternary: int8 [out, in] (out a multiple of 4) -> uint8 [out/4, in]."""
    codes = (np.asarray(ternary, dtype=np.int8) + 1).astype(np.uint8)
    blocks = codes.reshape(VALUES_PER_BYTE, codes.shape[0] // VALUES_PER_BYTE, codes.shape[1])
    return blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)
