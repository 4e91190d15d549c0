"""Tiny fixed-seed codecs and LMs shared by the bitstream tests (container, entropy, ecdc, v0, golden)."""
from __future__ import annotations

import dataclasses
import io

import torch

from neucodec.config import CodecConfig, LMConfig, RVQConfig, SEANetConfig, encodec_48khz
from neucodec.lm import LanguageModel
from neucodec.model import Codec

TINY_SEANET = dict(n_filters=4, dimension=16, lstm=1)


def tiny_codec24(seed: int = 0, n_q: int = 8, prepared: bool = True) -> Codec:
    torch.manual_seed(seed)
    cfg = CodecConfig(name="tiny24", seanet=SEANetConfig(**TINY_SEANET),
                      quantizer=RVQConfig(dimension=16, n_q=n_q, kmeans_init=False))
    codec = Codec(cfg)
    return codec.prepare_for_inference() if prepared else codec


def tiny_codec48(seed: int = 0, prepared: bool = True) -> Codec:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(
        encodec_48khz(), name="tiny48",
        seanet=SEANetConfig(channels=2, causal=False, norm="time_group_norm", **TINY_SEANET),
        quantizer=RVQConfig(dimension=16, n_q=16, kmeans_init=False))
    codec = Codec(cfg)
    return codec.prepare_for_inference() if prepared else codec


def skewed_lm(n_q: int = 8, seed: int = 0, favoured: int = 16) -> LanguageModel:
    """A tiny LM whose heads strongly favour codes < `favoured`, so LM coding beats packing."""
    torch.manual_seed(seed)
    lm = LanguageModel(LMConfig(n_q=n_q, dim=32, num_layers=2, num_heads=2, past_context=20)).eval()
    with torch.no_grad():
        for lin in lm.linears:
            lin.bias[:favoured] += 6.0
    return lm


def skewed_codes(B: int, K: int, F: int, seed: int = 0, favoured: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, favoured, (B, K, F), generator=g)
    rare = torch.rand(B, K, F, generator=g) < 0.02
    return torch.where(rare, torch.randint(0, 1024, (B, K, F), generator=g), codes)


def lm_coded_file(codec: Codec, lm: LanguageModel, frames: int = 40, segment_seconds: float = 0.2) -> bytes:
    """An .ecdc file of `codec` whose codes are `skewed_codes` (so LM coding beats packing)."""
    from neucodec import ecdc

    codes = skewed_codes(1, 8, frames)
    real = codec.quantizer.encode
    codec.quantizer.encode = lambda z, n_q: codes[:, :n_q, : z.shape[-1]]  # type: ignore[method-assign]
    try:
        return ecdc.encode_bytes(codec, 0.1 * torch.randn(1, 1, frames * 320), 6.0, lm,
                                 segment_seconds=segment_seconds)
    finally:
        codec.quantizer.encode = real  # type: ignore[method-assign]


class Pipe(io.RawIOBase):
    """A stream that cannot seek and hands out at most `chunk` bytes a read, as a pipe may."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        super().__init__()
        self.data, self.chunk = io.BytesIO(data), chunk

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        piece = self.data.read(min(len(b), self.chunk))
        b[: len(piece)] = piece
        return len(piece)
