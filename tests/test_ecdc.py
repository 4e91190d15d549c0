"""The stream API: whole signals in memory (`encode_bytes`/`decode_bytes`) and what the module offers."""
from __future__ import annotations

import json

import pytest
import torch

from _bitstream import tiny_codec48
from neucodec import ecdc, reader, streamspec, writer
from neucodec.errors import UnsupportedAudio


@pytest.fixture(scope="module")
def c48():
    return tiny_codec48()


def test_round_trip_48khz(c48) -> None:
    for T in (48000 * 2 + 700, 300, 48000):
        wav = 0.1 * torch.randn(1, 2, T)
        data = ecdc.encode_bytes(c48, wav, 6.0, chunk_seconds=0.3)
        info, audio = ecdc.decode_bytes(data, c48)
        assert audio.shape == wav.shape and info.layout == "overlap"
        assert torch.allclose(audio, c48.decode(c48.encode(wav, 6.0)), atol=1e-5)
        json.dumps(info.to_dict())


def test_the_api_is_the_modules_that_do_the_work(c48) -> None:
    assert ecdc.encode_stream is writer.encode_stream and ecdc.decode_stream is reader.decode_stream
    assert ecdc.read_info is reader.read_info and ecdc.StreamInfo is streamspec.StreamInfo
    assert ecdc.use_envelope is streamspec.use_envelope
    with pytest.raises(UnsupportedAudio, match=r"expected audio \[groups, channels, samples\]"):
        ecdc.encode_bytes(c48, torch.zeros(2, 4800), 6.0)
