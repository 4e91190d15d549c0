"""Fixed-width packing: round trips, the reference's BitPacker stream, exact sizes and zero padding."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neucodec import packing
from neucodec.errors import CorruptStream


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(0, 30), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_pack_round_trip(B: int, K: int, F: int, bits: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (B, K, F), generator=torch.Generator().manual_seed(seed))
    data = packing.pack(codes, bits)
    assert len(data) == packing.packed_size(B, K, F, bits)
    assert torch.equal(packing.unpack(data, B, K, F, bits), codes)


def test_pack_matches_reference_bitpacker() -> None:
    import sys
    import types

    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    from encodec.binary import BitPacker

    codes = torch.randint(0, 1024, (1, 3, 17))
    buf = io.BytesIO()
    packer = BitPacker(10, buf)
    for t in range(17):
        for k in range(3):
            packer.push(int(codes[0, k, t]))
    packer.flush()
    assert packing.pack(codes) == buf.getvalue()


def test_unpack_rejects_wrong_size_and_padding() -> None:
    data = packing.pack(torch.zeros(1, 1, 3, dtype=torch.long))  # 30 bits -> 4 bytes, 2 padding bits
    with pytest.raises(CorruptStream, match="expected 4"):
        packing.unpack(data + b"\0", 1, 1, 3)
    with pytest.raises(CorruptStream, match="padding"):
        packing.unpack(data[:3] + b"\xff", 1, 1, 3)


def test_pack_refuses_codes_out_of_range_and_other_shapes() -> None:
    with pytest.raises(ValueError, match="outside"):
        packing.pack(torch.full((1, 1, 2), 1024))
    with pytest.raises(ValueError, match="B, K, F"):
        packing.pack(torch.zeros(3, 4))
