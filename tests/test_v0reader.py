"""Version-0 files of the reference encodec package (with and without its LM) decode to the reference's codes/audio."""
from __future__ import annotations

import io
import sys
import types
import typing as tp

import pytest
import torch

from _bitstream import skewed_lm, tiny_codec24, tiny_codec48
from neucodec import config, ecdc
from neucodec.container import v0_header_bytes
from neucodec.engine import Call
from neucodec.errors import CorruptStream, ModelMismatch, NeucodecError, WeightsUnavailable
from neucodec.lm import LanguageModel
from neucodec.model import Codec

sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
encodec = pytest.importorskip("encodec")
from encodec.compress import compress  # noqa: E402
from encodec.model import EncodecModel, LMModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(name: str) -> tuple[EncodecModel, Codec]:
    torch.manual_seed(0)
    ref = getattr(EncodecModel, f"encodec_model_{name[8:]}")(pretrained=False)
    ref.name = name  # pretrained=False leaves it "unset"; compress() refuses that
    ref.eval()
    ours = Codec(config.OFFICIAL[name]())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.prepare_for_inference()


@pytest.mark.parametrize("name,bw,T", [("encodec_24khz", 6.0, 24000 + 77), ("encodec_48khz", 6.0, 48000 + 500)])
def test_reference_v0_decodes(name: str, bw: float, T: int) -> None:
    ref, ours = pair(name)
    ref.set_target_bandwidth(bw)
    wav = 0.1 * torch.randn(ref.channels, T)
    data = compress(ref, wav, use_lm=False)
    info, audio = ecdc.decode_bytes(data, ours)
    assert info.format_version == 0 and info.length == T and info.n_q == ours.n_q_for_bandwidth(bw)
    with torch.no_grad():
        frames = ref.encode(wav[None])
        expected = ref.decode(frames)[0, :, :T]
    assert audio.shape == (1, ref.channels, T)
    assert torch.allclose(audio[0], expected, atol=1e-4), (audio[0] - expected).abs().max()
    # the codes themselves: re-encoding with our codec gives the reference's codes
    ours_codes = ours.encode(wav[None], bw).codes
    assert torch.equal(ours_codes, torch.cat([f[0] for f in frames], -1))
    # truncation and wrong model are one-line errors
    with pytest.raises(CorruptStream, match="truncated"):
        ecdc.decode_bytes(data[:-3], ours)
    other = tiny_codec48() if name == "encodec_24khz" else tiny_codec24()
    with pytest.raises(ModelMismatch, match=name):
        ecdc.decode_bytes(data, other)


def test_v0_bad_headers_are_corrupt() -> None:
    for bad in ({"m": "x", "al": 1, "nc": 1, "lm": False}, {"m": "encodec_24khz", "al": -1, "nc": 8, "lm": False},
                {"m": "encodec_24khz", "al": 10, "nc": 99, "lm": False}, {"m": "encodec_24khz", "al": 10, "nc": 8}):
        with pytest.raises(CorruptStream):
            ecdc.decode_bytes(v0_header_bytes(bad))


# ---------------------------------------------------------------- files coded with the reference LM
def reference_lm(ref: EncodecModel, seed: int) -> tuple[LMModel, LanguageModel]:
    """A random LM as the reference builds it for `ref`, and the same weights in a neucodec LM."""
    torch.manual_seed(seed)
    rlm = LMModel(ref.quantizer.n_q, 1024, num_layers=5, dim=200, past_context=int(3.5 * ref.frame_rate)).eval()
    lm = LanguageModel(config.lm_for(config.OFFICIAL[ref.name]()))
    lm.load_state_dict(rlm.state_dict(), strict=True)
    return rlm, lm.eval()


def random_frames(ref: EncodecModel, length: int, K: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """What `ref.encode` returns for `length` samples, with uniformly random codes (random codebooks
    give nearly constant codes, which would not exercise the coder)."""
    g = torch.Generator().manual_seed(seed)
    if ref.segment_length is None:
        return [(torch.randint(0, 1024, (1, K, -(-length // 320)), generator=g), None)]
    return [(torch.randint(0, 1024, (1, K, -(-min(length - offset, ref.segment_length) // 320)), generator=g),
             0.05 + torch.rand(1, 1, generator=g))
            for offset in range(0, length, ref.segment_stride)]


def write_v0(monkeypatch: pytest.MonkeyPatch, ref: EncodecModel, rlm: LMModel,
             frames: list[tuple[torch.Tensor, torch.Tensor | None]], length: int, use_lm: bool = True) -> bytes:
    """A version-0 file written by the reference `compress`, with our LM and codes."""
    monkeypatch.setattr(EncodecModel, "get_lm_model", lambda self: rlm)  # (the real one downloads and reseeds)
    monkeypatch.setattr(ref, "encode", lambda wav: frames)
    return compress(ref, torch.zeros(ref.channels, length), use_lm=use_lm)


def decode_codes(data: bytes, ours: Codec, lm: LanguageModel | None,
                 **kw: tp.Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode with neucodec, recording the codes each segment hands to the codec."""
    seen: list[torch.Tensor] = []
    stream, segments = ours.decode_calls, ours._decode_segments

    def spy_stream(pieces: tp.Iterable[tp.Any]) -> tp.Iterator[tp.Any]:
        return stream(p if isinstance(p, Call) else seen.append(p) or p for p in pieces)  # type: ignore[func-returns-value]

    def spy_segments(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        seen.append(codes)
        return segments(codes, scale)

    ours.decode_calls, ours._decode_segments = spy_stream, spy_segments  # type: ignore[method-assign]
    try:
        _, audio = ecdc.decode_bytes(data, ours, lm, **kw)
    finally:
        del ours.decode_calls, ours._decode_segments
    return audio, seen


@pytest.mark.parametrize("name,K,seconds", [("encodec_24khz", 4, 3.6), ("encodec_48khz", 4, 1.1)])
def test_reference_v0_lm_decodes(monkeypatch: pytest.MonkeyPatch, name: str, K: int, seconds: float) -> None:
    """24 kHz: one stream longer than the LM's past context (262 frames); 48 kHz: two scaled segments."""
    ref, ours = pair(name)
    rlm, lm = reference_lm(ref, seed=7)
    length = int(seconds * ref.sample_rate) + 77
    frames = random_frames(ref, length, K, seed=1)
    data = write_v0(monkeypatch, ref, rlm, frames, length)
    plain = write_v0(monkeypatch, ref, rlm, frames, length, use_lm=False)
    info = ecdc.read_info(io.BytesIO(data))
    assert info.format_version == 0 and info.lm_id == f"encodec_lm_{name[8:]}" and info.n_q == K
    audio, codes = decode_codes(data, ours, lm)
    if ref.segment_length is None:
        assert torch.equal(torch.cat(codes, -1), frames[0][0])
    else:
        assert len(codes) == len(frames) and all(torch.equal(c, f) for c, (f, _) in zip(codes, frames))
    _, unpacked = ecdc.decode_bytes(plain, ours)
    assert audio.shape == (1, ref.channels, length) and torch.equal(audio, unpacked)
    with torch.no_grad():
        expected = ref.decode(frames)[0, :, :length]
    assert torch.allclose(audio[0], expected, atol=1e-4), (audio[0] - expected).abs().max()


@pytest.mark.parametrize("name", ["encodec_24khz", "encodec_48khz"])
def test_reference_v0_lm_damage(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Truncated, extended or altered files: one-line CorruptStream errors, never a traceback or a hang."""
    ref, ours = pair(name)
    rlm, lm = reference_lm(ref, seed=2)
    length = 16000 if name == "encodec_24khz" else ref.segment_stride + 1000  # 48 kHz: 2 segments
    data = write_v0(monkeypatch, ref, rlm, random_frames(ref, length, 2, seed=4), length)
    for bad, match in ((data[:-1], "truncated"), (data[:-30], "truncated|do not decode"),
                       (data + b"\0", "after the last coded segment")):
        with pytest.raises(CorruptStream, match=match) as e:
            ecdc.decode_bytes(bad, ours, lm)
        assert "\n" not in str(e.value)
    for pos in (len(data) // 2, len(data) - 5):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        try:  # version 0 has no checksums: a flip may decode to other (or, near the end, the same) audio
            ecdc.decode_bytes(bytes(flipped), ours, lm)
        except CorruptStream as err:
            assert "\n" not in str(err)


def test_reference_v0_lm_needs_the_right_lm(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = pair("encodec_24khz")
    rlm, lm = reference_lm(ref, seed=3)
    data = write_v0(monkeypatch, ref, rlm, random_frames(ref, 3200, 2, seed=2), 3200)
    with pytest.raises(WeightsUnavailable, match="encodec_lm_24khz.*neucodec download encodec_lm_24khz"):
        ecdc.decode_bytes(data, ours)  # offline, empty cache: the official LM is missing
    with pytest.raises(ModelMismatch, match="encodec_lm_24khz"):
        ecdc.decode_bytes(data, ours, skewed_lm())
    try:  # another LM of the same shape: version 0 has no checksums, so wrong codes go unnoticed
        ecdc.decode_bytes(data, ours, reference_lm(ref, seed=4)[1])  # (or, with two nearly uniform random
    except CorruptStream:  # LMs, the same codes: seen on a second machine); never another exception
        pass


def test_reference_v0_lm_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's probabilities depend on its torch thread count; the decoder is told the writer's."""
    ref, ours = pair("encodec_24khz")
    rlm, lm = reference_lm(ref, seed=5)
    length = 3200  # 10 frames: enough steps for the attention's thread split to change the last bits
    frames = random_frames(ref, length, 2, seed=3)
    torch.set_num_threads(2)
    try:
        data = write_v0(monkeypatch, ref, rlm, frames, length)
    finally:
        torch.set_num_threads(1)
    # (measured with torch 2.13 on x86: decoded with one thread, these codes come out wrong)
    _, codes = decode_codes(data, ours, lm, v0_lm_threads=2)
    assert torch.equal(torch.cat(codes, -1), frames[0][0])
    monkeypatch.setenv("NEUCODEC_V0_LM_THREADS", "two")
    with pytest.raises(NeucodecError, match="NEUCODEC_V0_LM_THREADS"):
        ecdc.decode_bytes(data, ours, lm)
