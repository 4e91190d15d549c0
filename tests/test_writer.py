"""Streaming writer: pipes, groups, the LM, settings checked once, audio it refuses."""
from __future__ import annotations

import io

import pytest
import torch

from _bitstream import skewed_codes, skewed_lm, tiny_codec24
from neucodec import ecdc, streamspec, writer
from neucodec.errors import ModelMismatch, UnsupportedAudio, UnsupportedSetting
from neucodec.model import EncodedAudio


@pytest.fixture(scope="module")
def c24():
    return tiny_codec24()


class WriteOnlyPipe(io.RawIOBase):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(b))
        return len(b)


def test_round_trip_24khz_groups_and_pipe(c24) -> None:
    wav = 0.1 * torch.randn(2, 1, 24000 * 2 + 123)
    pipe = WriteOnlyPipe()
    seen: list[int] = []
    info = writer.encode_stream(pipe, c24, wav.split(5000, -1), bandwidth=3.0, lm=None, source_sample_rate=44100,
                                source_channels=2, segment_seconds=0.5, progress=seen.append)
    data = b"".join(pipe.chunks)
    assert sum(seen) == wav.shape[-1] and info.length == wav.shape[-1] and info.bytes == len(data)
    assert info.segments == 4 and info.n_q == 4 and info.groups == 2
    got, audio = ecdc.decode_bytes(data, c24)
    assert audio.shape == wav.shape and got.length == wav.shape[-1] and got.source_sample_rate == 44100
    ref = c24.decode(c24.encode(wav, 3.0))
    assert torch.allclose(audio, ref, atol=1e-5)
    assert ecdc.read_info(io.BytesIO(data)).to_dict() == got.to_dict()


def test_settings_checked_once_give_the_same_stream(c24) -> None:
    wav = 0.1 * torch.randn(1, 1, 24000)
    settings = streamspec.encode_settings(c24, 3.0, "e2")
    assert (settings.bandwidth, settings.n_q, settings.envelope and settings.envelope.table) == (3.0, 4, "e2")
    given = ecdc.encode_bytes(c24, wav, None, settings=settings, segment_seconds=0.5)
    asked = ecdc.encode_bytes(c24, wav, 3.0, segment_seconds=0.5, correct_envelope="e2")
    assert given == asked


def test_unsupported_settings_are_named(c24) -> None:
    wav = 0.1 * torch.randn(1, 1, 2400)
    with pytest.raises(UnsupportedSetting, match="does not support 5 kbps; use one of 1.5, 3, 6, 12, 24"):
        ecdc.encode_bytes(c24, wav, 5.0)
    with pytest.raises(UnsupportedSetting, match="the LM models 4 codebooks but 8 are coded"):
        ecdc.encode_bytes(c24, wav, 6.0, skewed_lm(n_q=4))
    assert issubclass(UnsupportedSetting, ValueError)


def test_nan_audio_is_refused_with_its_time(c24) -> None:
    wav = 0.1 * torch.randn(1, 1, 24000)
    wav[0, 0, 18000] = float("nan")
    with pytest.raises(UnsupportedAudio, match=r"NaN or infinite samples \(first at 0.750 s"):
        ecdc.encode_bytes(c24, wav, 1.5, chunk_seconds=0.5)


def test_lm_round_trip_encode_2_threads_decode_1(c24, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = skewed_lm()
    wav = 0.1 * torch.randn(1, 1, 24000)
    # make the codes compressible for the skewed LM: encode real audio, then swap in skewed codes
    codes = skewed_codes(1, 8, 75)
    done = 0  # frames handed out so far: the encoder runs in several steps

    def skewed(z: torch.Tensor, n_q: int) -> torch.Tensor:
        nonlocal done
        done += z.shape[-1]
        return codes[:, :n_q, done - z.shape[-1]: done].to(z.device)

    monkeypatch.setattr(c24.quantizer, "encode", skewed)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = ecdc.encode_bytes(c24, wav, 6.0, lm, segment_seconds=0.4)
        monkeypatch.undo()
        torch.set_num_threads(1)
        info, audio = ecdc.decode_bytes(data, c24, lm)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(old)
    assert info.lm_segments == info.segments == 3 and info.coder is not None
    assert torch.allclose(audio, c24.decode(EncodedAudio(codes, None, 24000)), atol=1e-5)
    with pytest.raises(ModelMismatch, match="LM"):
        ecdc.decode_bytes(data, c24, skewed_lm(seed=1))


def test_empty_input(c24) -> None:
    data = ecdc.encode_bytes(c24, torch.zeros(1, 1, 0), 6.0)
    info, audio = ecdc.decode_bytes(data, c24)
    assert info.length == 0 and audio.shape == (1, 1, 0)
