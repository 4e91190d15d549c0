"""The reference's arithmetic decoder (`v0lm`): the symbols the reference coder wrote, byte for byte."""
from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch

from neucodec import v0lm
from neucodec.errors import CorruptStream

sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
encodec = pytest.importorskip("encodec")
from encodec.quantization.ac import ArithmeticCoder, build_stable_quantized_cdf  # noqa: E402


def test_arithmetic_decoder_matches_reference_coder() -> None:
    """Flat and peaked distributions, two segments back to back, each flushed to a byte boundary."""
    g = torch.Generator().manual_seed(0)
    fo = io.BytesIO()
    segments: list[tuple[list[torch.Tensor], list[int], int]] = []
    for scale, n in ((1.0, 300), (12.0, 700)):  # the peaked one codes many symbols per bit
        coder = ArithmeticCoder(fo)
        pdfs = [torch.softmax(scale * torch.randn(1024, generator=g), 0) for _ in range(n)]
        symbols = [int(torch.multinomial(p, 1, generator=g)) for p in pdfs]
        for p, sym in zip(pdfs, symbols):
            coder.push(sym, build_stable_quantized_cdf(p, 24, check=False))
        coder.flush()
        segments.append((pdfs, symbols, fo.tell()))
    data = fo.getvalue()
    source = v0lm.ByteSource(io.BytesIO(data), 0)
    for i, (pdfs, symbols, end) in enumerate(segments):
        decoder = v0lm.ArithmeticDecoder(source, f"segment {i}")
        cdfs = v0lm.quantized_cdf(torch.stack(pdfs, 1))  # [n, 1024]
        for j, p in enumerate(pdfs[:50]):
            assert np.array_equal(cdfs[j], build_stable_quantized_cdf(p, 24, check=False).numpy())
        assert [decoder.pull(c) for c in cdfs] == symbols
        assert source.offset == end  # the decoder consumed exactly the segment's bytes
    with pytest.raises(CorruptStream, match="truncated"):
        cut = v0lm.ByteSource(io.BytesIO(data[: segments[0][2] - 1]), 0)
        decoder = v0lm.ArithmeticDecoder(cut, "segment 0")
        for c in v0lm.quantized_cdf(torch.stack(segments[0][0], 1)):
            decoder.pull(c)
