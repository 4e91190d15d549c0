"""The codec on tiny configs: shapes, bandwidths, streaming equivalence, errors at the edge."""
from __future__ import annotations

import pytest
import torch

from neucodec import config as cfg
from neucodec import model
from neucodec.errors import UnsupportedAudio, UnsupportedSetting
from neucodec.model import Codec, OverlapAdd, Segment, overlap_add, segment_layout
from reference import randomize


def tiny(causal: bool = True, **kw: object) -> Codec:
    seanet = cfg.SEANetConfig(n_filters=4, dimension=16, lstm=1, causal=causal,
                              norm="weight_norm" if causal else "time_group_norm",
                              channels=1 if causal else 2)
    c = cfg.CodecConfig(name="tiny", channels=seanet.channels, seanet=seanet,
                        quantizer=cfg.RVQConfig(dimension=16, n_q=8, bins=1024, kmeans_init=False), **kw)  # type: ignore[arg-type]
    return randomize(Codec(c)).prepare_for_inference()  # type: ignore[return-value]


@pytest.mark.parametrize("length", [1, 319, 320, 321, 4799, 24000])
def test_frames_and_lengths(length: int) -> None:
    codec = tiny()
    enc = codec.encode(torch.randn(2, 1, length) * 0.1, 6.0)
    assert enc.codes.shape == (2, 8, -(-length // 320))
    assert codec.decode(enc).shape == (2, 1, length)


def test_bandwidth_rule_and_prefix_property() -> None:
    codec = tiny()
    wav = torch.randn(1, 1, 4800) * 0.1
    full = codec.encode(wav, None).codes
    for bw, k in ((1.5, 2), (3.0, 4), (6.0, 8)):
        codes = codec.encode(wav, bw).codes
        assert codes.shape[1] == k
        assert torch.equal(codes, full[:, :k])  # residual quantization is a prefix code
    with pytest.raises(UnsupportedSetting, match="does not support 5 kbps"):
        codec.encode(wav, 5.0)


def test_steps_depend_only_on_the_length() -> None:
    x = torch.arange(1000.0).view(1, 1, -1)

    def sizes(chunks: list[torch.Tensor]) -> list[int]:
        pieces = list(model.steps(chunks, 128, 16))
        assert [final for _, final in pieces] == [False] * (len(pieces) - 1) + [True] * bool(pieces)
        return [p.shape[-1] for p, _ in pieces]

    for cut in (7, 100, 333, 1000):
        assert sizes(list(x.split(cut, -1))) == [128] * 7 + [64, 32, 8]  # 1000 = 7 * 128 + 104
        assert torch.equal(torch.cat([p for p, _ in model.steps(x.split(cut, -1), 128, 16)], -1), x)
    assert sizes([x[..., :128]]) == [64, 32, 16, 16]
    assert sizes([x[..., :129]]) == [128, 1]
    assert sizes([x[..., :20]]) == [16, 4]
    assert sizes([x[..., :5]]) == [5]
    assert sizes([]) == []


def test_streaming_encode_matches_one_pass_and_decode_stream_matches() -> None:
    codec = tiny()
    wav = torch.randn(1, 1, 3 * 24000 + 555) * 0.1
    one = codec.encode(wav, 6.0, chunk_seconds=None)
    for chunk in (2560, 7777, 24000):
        streamed = torch.cat(list(codec.encode_stream(wav.split(chunk, dim=-1), 8)), dim=-1)
        assert streamed.shape == one.codes.shape
        differ = (streamed != one.codes).float().mean().item()
        assert differ <= 0.001, differ
    chunked = codec.encode(wav, 6.0, chunk_seconds=0.5)  # the public API takes the chunked path
    assert (chunked.codes != one.codes).float().mean() <= 0.001
    audio = codec.decode(one)
    pieces = torch.cat(list(codec.decode_stream(one.codes.split(5, dim=-1))), dim=-1)[..., : wav.shape[-1]]
    assert (pieces - audio).abs().max() < 1e-4


def test_segmented_model_batches_segments_and_recombines() -> None:
    codec = tiny(causal=False, sample_rate=48000, segment=0.1, normalize=True, bandwidths=(6.0, 12.0))
    wav = torch.randn(1, 2, 48000 // 2 + 123) * 0.1
    enc = codec.encode(wav, 12.0)
    segs = codec.segments(wav.shape[-1])
    assert len(segs) == 6 and enc.scales is not None and enc.scales.shape == (1, 6)
    assert enc.codes.shape[-1] == sum(s.frames for s in segs)
    out = codec.decode(enc)
    assert out.shape == wav.shape and torch.isfinite(out).all()
    # each segment alone gives the same codes as the batched pass
    s = segs[2]
    alone, scale = codec._encode_segments(wav[..., s.offset: s.offset + s.length], 8)
    start = sum(x.frames for x in segs[:2])
    assert torch.equal(alone, enc.codes[..., start: start + s.frames])
    assert scale is not None and torch.equal(scale, enc.scales[:, 2])


@pytest.mark.parametrize("bad,match", [
    (torch.randn(1, 100), "shape \\[batch, channels, samples\\]"),
    (torch.randn(1, 2, 100), "takes 1 channel"),
    (torch.randn(1, 1, 0), "empty"),
    (torch.zeros(1, 1, 100, dtype=torch.int16), "float"),
])
def test_edge_checks_say_what_to_pass(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(UnsupportedAudio, match=match):
        tiny().encode(bad)


def test_smaller_model_is_one_line() -> None:
    small = Codec(cfg.CodecConfig(seanet=cfg.SEANetConfig(n_filters=16)))
    big = Codec(cfg.CodecConfig())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(big) / 3
    assert n(big) == 14_851_810  # the released 24 kHz model's parameter count


def test_forward_under_bf16_autocast_matches_float32() -> None:
    """Training on a GPU runs the codec under bf16 autocast (the fused residual output included)."""
    torch.manual_seed(0)
    codec = tiny()
    x = 0.1 * torch.randn(2, 1, 4800)
    with torch.no_grad():
        y32 = codec.decoder(codec.encoder(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = codec.decoder(codec.encoder(x))
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, atol=0.05 * float(y32.abs().max()))


def test_segment_layout() -> None:
    assert segment_layout(1000, 320, None, None) == [Segment(0, 1000, 4)]
    assert segment_layout(0, 320, 48000, 47520) == [Segment(0, 0, 0)]
    # the segment before the last is cut short where the length ends in their overlap
    assert segment_layout(95140, 320, 48000, 47520) == [Segment(0, 48000, 150), Segment(47520, 47620, 149),
                                                        Segment(95040, 100, 1)]


@pytest.mark.parametrize("lengths", [[100, 100, 100], [100, 100, 37], [100, 63], [100]])
def test_overlap_add_one_segment_at_a_time_is_overlap_add(lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(len(lengths))
    frames = [torch.randn(2, 3, n, generator=g) for n in lengths]
    whole = overlap_add(frames, 90)
    ola = OverlapAdd(90)
    pieces = [ola.add(f, last=i == len(frames) - 1) for i, f in enumerate(frames)]
    assert [p.shape[-1] for p in pieces[:-1]] == [90] * (len(frames) - 1)
    assert torch.equal(torch.cat(pieces, -1), whole) and whole.shape[-1] == 90 * (len(frames) - 1) + lengths[-1]
    if len(frames) > 1:
        assert torch.allclose(whole[..., :80], frames[0][..., :80], atol=1e-6)  # one segment alone: unchanged
