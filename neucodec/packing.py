"""Fixed-width bit packing of codes [B, K, F]: each code in `bits` bits, LSB-first, time-major per sequence.

For B = 1 the stream is exactly the reference encodec's `BitPacker` output, so the segments of
neucodec files coded without the LM and the payload of version-0 files of the reference tool both
use these functions.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import CorruptStream

Tensor = torch.Tensor


def codes_array(codes: Tensor | np.ndarray) -> np.ndarray:
    """Codes [B, K, F] as an int64 numpy array (ValueError for another number of dimensions)."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if arr.ndim != 3:
        raise ValueError(f"codes must be [B, K, F], got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def packed_size(B: int, K: int, F: int, bits: int = 10) -> int:
    return (B * K * F * bits + 7) // 8


def pack(codes: Tensor | np.ndarray, bits: int = 10) -> bytes:
    """Codes [B, K, F] -> ceil(B*K*F*bits/8) bytes, `bits` per code, LSB-first, time-major per item.

    Args:
        codes: integers in [0, 2**bits).
        bits: width of each code.
    Returns:
        the packed bytes; the last byte is zero-padded at the top.
    """
    arr = codes_array(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits})")
    flat = arr.transpose(0, 2, 1).reshape(-1)  # for b, for t, for k
    bitarr = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bitarr.reshape(-1), bitorder="little").tobytes()


def unpack(payload: bytes, B: int, K: int, F: int, bits: int = 10, where: str = "segment") -> Tensor:
    """Inverse of `pack`: payload -> codes [B, K, F] int64. The size must be exact, padding zero."""
    n = B * K * F
    expected = packed_size(B, K, F, bits)
    if len(payload) != expected:
        raise CorruptStream(f"{where}: packed payload has {len(payload)} bytes, expected {expected} "
                            f"for {B}x{K}x{F} codes (file damaged)")
    bitarr = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")
    if bitarr[n * bits:].any():
        raise CorruptStream(f"{where}: non-zero padding bits (file damaged)")
    values = bitarr[: n * bits].reshape(n, bits).astype(np.int64) << np.arange(bits)
    flat = values.sum(axis=1)
    return torch.from_numpy(np.ascontiguousarray(flat.reshape(B, F, K).transpose(0, 2, 1)))
