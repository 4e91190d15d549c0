"""Audio of decoded segment codes: cut to the stream's length, the end checked once, segments overlap-added."""
from __future__ import annotations

import torch

from _bitstream import tiny_codec24, tiny_codec48
from neucodec import ecdc, engine, streamaudio
from neucodec.model import EncodedAudio
from neucodec.streamaudio import SegmentCodes


def _info(codec, T: int):  # type: ignore[no-untyped-def]
    return ecdc.decode_bytes(ecdc.encode_bytes(codec, 0.1 * torch.randn(1, codec.channels, T), 6.0), codec)[0]


def test_a_causal_stream_is_cut_to_its_length_after_its_last_segment() -> None:
    codec = tiny_codec24()
    info = _info(codec, 1000)
    codes = torch.randint(0, 1024, (1, 8, 39))  # 12345 samples
    calls: list[int] = []

    def finish() -> int:
        calls.append(len(calls))
        return 12345

    chunks = list(engine.alone(streamaudio.audio(iter([SegmentCodes(codes[..., :25], None, None),
                                                       SegmentCodes(codes[..., 25:], None, None)]),
                                                 codec, info, finish)))
    audio = torch.cat(chunks, -1)
    assert calls == [0] and audio.shape == (1, 1, 12345)
    assert torch.allclose(audio, codec.decode(EncodedAudio(codes, None, 12345)), atol=1e-5)
    assert list(engine.alone(streamaudio.audio(iter([]), codec, info, finish))) == [] and calls == [0, 1]  # no segments


def test_segments_are_overlap_added_as_the_codec_does() -> None:
    codec = tiny_codec48()
    T = 48000 + 47520 + 3000
    info = _info(codec, T)
    encoded = codec.encode(0.1 * torch.randn(1, 2, T), 6.0)
    segments, start = [], 0
    for i, seg in enumerate(codec.segments(T)):
        segments.append(SegmentCodes(encoded.codes[..., start: start + seg.frames], encoded.scales[:, i], None))
        start += seg.frames
    chunks = list(engine.alone(streamaudio.audio(iter(segments), codec, info, lambda: T)))
    assert [c.shape[-1] for c in chunks[:-1]] == [47520, 47520]
    assert torch.allclose(torch.cat(chunks, -1), codec.decode(encoded), atol=1e-5)
