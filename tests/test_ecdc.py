"""Streaming writer/reader: round trips, pipes, models named in the header, corruption -> one-line errors."""
from __future__ import annotations

import dataclasses
import io
import json
import typing as tp
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _bitstream import lm_coded_file, skewed_codes, skewed_lm, tiny_codec24, tiny_codec48
from neucodec import container, ecdc
from neucodec.errors import (CorruptStream, ModelMismatch, NeucodecError, UnsupportedAudio, UnsupportedFormatVersion,
                             WeightsUnavailable)
from neucodec.weights import load_weights, save_release


@pytest.fixture(scope="module")
def c24():
    return tiny_codec24()


@pytest.fixture(scope="module")
def c48():
    return tiny_codec48()


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
    info = ecdc.encode_stream(pipe, c24, wav.split(5000, -1), bandwidth=3.0, lm=None, source_sample_rate=44100,
                              source_channels=2, segment_seconds=0.5, progress=seen.append)
    data = b"".join(pipe.chunks)
    assert sum(seen) == wav.shape[-1] and info.length == wav.shape[-1] and info.bytes == len(data)
    assert info.segments == 4 and info.n_q == 4 and info.groups == 2
    got, audio = ecdc.decode_bytes(data, c24)
    assert audio.shape == wav.shape and got.length == wav.shape[-1] and got.source_sample_rate == 44100
    ref = c24.decode(c24.encode(wav, 3.0))
    assert torch.allclose(audio, ref, atol=1e-5)
    assert ecdc.read_info(io.BytesIO(data)).to_dict() == got.to_dict()
    json.dumps(got.to_dict())


def test_source_length_residue_is_checked(c24) -> None:
    """The end record's residue restores the 44.1 kHz length; one that cannot fit is damage."""
    wav = 0.1 * torch.randn(1, 1, 24000)
    data = bytearray(ecdc.encode_bytes(c24, wav, 1.5, source_sample_rate=44100, source_length=lambda: 44101))
    assert ecdc.decode_bytes(bytes(data), c24)[0].source_length == 44101
    end = ecdc.read_info(io.BytesIO(bytes(data))).bytes - 2 * container.RECORD_HEAD_BYTES - 12 - 8 - \
        container.TRAILER_BYTES  # the end record's offset (one segment)
    assert data[end] == container.KIND_END and data[end + 1] == container.END_SOURCE_RESIDUE
    data[end + 2: end + 4] = (44101 + 9 & 0xFFFF).to_bytes(2, "little")
    data[end + 20: end + 24] = container.crc32(bytes(data[end: end + 20])).to_bytes(4, "little")
    with pytest.raises(CorruptStream, match=f"end marker at byte {end}: original length"):
        ecdc.decode_bytes(bytes(data), c24)


def test_nan_audio_is_refused_with_its_time(c24) -> None:
    wav = 0.1 * torch.randn(1, 1, 24000)
    wav[0, 0, 18000] = float("nan")
    with pytest.raises(UnsupportedAudio, match=r"NaN or infinite samples \(first at 0.750 s"):
        ecdc.encode_bytes(c24, wav, 1.5, chunk_seconds=0.5)


def test_round_trip_48khz(c48) -> None:
    for T in (48000 * 2 + 700, 300, 48000):
        wav = 0.1 * torch.randn(1, 2, T)
        data = ecdc.encode_bytes(c48, wav, 6.0, chunk_seconds=0.3)
        info, audio = ecdc.decode_bytes(data, c48)
        assert audio.shape == wav.shape and info.layout == "overlap"
        assert torch.allclose(audio, c48.decode(c48.encode(wav, 6.0)), atol=1e-5)


def test_lm_round_trip_encode_2_threads_decode_1(c24, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = skewed_lm()
    wav = 0.1 * torch.randn(1, 1, 24000)
    # make the codes compressible for the skewed LM: encode real audio, then swap in skewed codes
    codes = skewed_codes(1, 8, 75)
    done = [0]  # frames handed out so far: the encoder runs in several steps

    def skewed(z: torch.Tensor, n_q: int) -> torch.Tensor:
        done[0] += z.shape[-1]
        return codes[:, :n_q, done[0] - z.shape[-1]: done[0]].to(z.device)

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
    assert torch.allclose(audio, c24.decode(ecdc_codes(codes)), atol=1e-5)
    with pytest.raises(ModelMismatch, match="LM"):
        ecdc.decode_bytes(data, c24, skewed_lm(seed=1))


def ecdc_codes(codes: torch.Tensor):
    from neucodec.model import EncodedAudio

    return EncodedAudio(codes, None, 24000)


def test_empty_input(c24) -> None:
    data = ecdc.encode_bytes(c24, torch.zeros(1, 1, 0), 6.0)
    info, audio = ecdc.decode_bytes(data, c24)
    assert info.length == 0 and audio.shape == (1, 1, 0)


def test_a_new_decoder_reads_the_files_of_the_weights_it_was_trained_from(tmp_path: Path) -> None:
    """Release B (decoder changed, same encoder, codebooks and LM) lists A, so A's files decode
    with B and with B's fine-tuning C; D (encoder changed) lists neither and refuses them."""
    from neucodec.hub import load_codec, load_lm

    raw, lm = tiny_codec24(prepared=False), skewed_lm()

    def release(folder: str, *parents: Path, config: tp.Any = raw.config) -> Path:
        return save_release(tmp_path / folder / "bs_tiny.json", "bs_tiny", raw, config, lm, lm.cfg,
                            dtype=torch.float32, parents=[load_weights(p) for p in parents])

    a = release("a", config=dataclasses.replace(raw.config, bandwidths=(1.5, 3.0, 4.5, 6.0)))  # offers one more
    data = lm_coded_file(load_codec(a), load_lm(a))
    with torch.no_grad():
        next(raw.decoder.parameters()).add_(0.01)
    b = release("b", a)
    with torch.no_grad():
        next(raw.decoder.parameters()).add_(0.01)
    c = release("c", b)
    fa, fb = load_weights(a).fingerprint, load_weights(b).fingerprint
    assert load_weights(b).compatible == {"codec": [fa], "lm": [fa]}
    assert load_weights(c).compatible == {"codec": [fb, fa], "lm": [fb, fa]}
    info, want = ecdc.decode_bytes(data, load_codec(a), load_lm(a))
    assert info.lm_segments > 0
    for newer in (b, c):
        _, audio = ecdc.decode_bytes(data, load_codec(newer), load_lm(newer))
        assert audio.shape == want.shape and not torch.equal(audio, want)  # same codes, the new decoder
    with torch.no_grad():
        next(raw.encoder.parameters()).add_(0.01)
    d = release("d", c)
    assert load_weights(d).compatible == {"lm": [load_weights(c).fingerprint, fb, fa]}
    with pytest.raises(ModelMismatch, match=f"model bs_tiny \\(weights {fa}\\).*version that wrote it"):
        ecdc.decode_bytes(data, load_codec(d), load_lm(d))
    meta = json.loads(d.read_text())  # a release lists the earlier defaults: the advice names the one
    meta["earlier"] = {fa: {"neucodec": "0.5.0", "commit": "0f1799b"}}
    d.write_text(json.dumps(meta))
    with pytest.raises(ModelMismatch, match="neucodec 0.5.0's default model.*commit 0f1799b"):
        ecdc.decode_bytes(data, load_codec(d), load_lm(d))
    meta["earlier"] = {fa: "0.5.0"}
    d.write_text(json.dumps(meta))
    with pytest.raises(WeightsUnavailable, match="'earlier' must map"):
        load_codec(d)


def test_model_resolved_from_header_and_mismatch(c24, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tiny_codec24(prepared=False)
    save_release(tmp_path / "bs_tiny.json", "bs_tiny", raw, raw.config, dtype=torch.float32)
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path))
    from neucodec.hub import load_codec

    codec = load_codec("bs_tiny")
    data = ecdc.encode_bytes(codec, 0.1 * torch.randn(1, 1, 5000), 6.0)
    info, audio = ecdc.decode_bytes(data)  # loads bs_tiny itself
    assert info.model_id == "bs_tiny" and audio.shape == (1, 1, 5000)
    with pytest.raises(ModelMismatch, match="bs_tiny"):
        ecdc.decode_bytes(data, tiny_codec24(seed=5))
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path / "nothing"))
    with pytest.raises(NeucodecError):
        ecdc.decode_bytes(data)


def _file(c24) -> bytes:
    return ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 24000), 6.0, segment_seconds=0.25)


def test_corruption_classes(c24) -> None:
    data = _file(c24)
    fo = io.BytesIO(data)
    reader = container.ContainerReader(fo, container.read_prelude(fo))
    records = list(reader)
    cases = {
        "empty": (b"", "empty"),
        "magic": (b"XXXX" + data[4:], "not an .ecdc file"),
        "version": (data[:4] + b"\x09" + data[5:], "version 9"),
        "truncated": (data[: records[2].offset + 30], f"segment 2 at byte {records[2].offset}"),
        "flip": (data[: records[1].offset + 40] + bytes([data[records[1].offset + 40] ^ 4])
                 + data[records[1].offset + 41:], f"segment 1 at byte {records[1].offset}: CRC mismatch"),
        "no end": (data[: reader.end.offset], "end marker is missing"),  # type: ignore[union-attr]
    }
    for name, (bad, match) in cases.items():
        with pytest.raises(CorruptStream, match=match):
            ecdc.decode_bytes(bad, c24)
        with pytest.raises(CorruptStream):
            ecdc.read_info(io.BytesIO(bad))
    with pytest.raises(UnsupportedFormatVersion):
        ecdc.decode_bytes(cases["version"][0], c24)


def test_header_that_lies_about_length(c24) -> None:
    data = bytearray(_file(c24))
    fo = io.BytesIO(bytes(data))
    reader = container.ContainerReader(fo, container.read_prelude(fo))
    list(reader)
    end = reader.end
    assert end is not None
    # rewrite the end record with a wrong length but valid CRCs
    payload = container._END.pack(10**12, end.segments)
    head = container._HEAD.pack(container.KIND_END, 0, 0, len(payload), end.frames, container.crc32(payload), 0)
    rec = head + container.crc32(head).to_bytes(4, "little") + payload
    bad = bytes(data[: end.offset]) + rec + bytes(data[end.offset + len(rec):])
    with pytest.raises(CorruptStream, match="end marker at byte"):
        ecdc.decode_bytes(bad, c24)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_sample_decode(c24, data: st.DataObject) -> None:
    base = bytearray(FUZZ_BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(base) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "byte"]))
        if op == "flip":
            base[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del base[pos:]
            if not base:
                break
        else:
            base[pos] = data.draw(st.integers(0, 255))
    try:
        ecdc.decode_bytes(bytes(base), c24)
    except NeucodecError as e:
        assert "\n" not in str(e)


FUZZ_BASE = ecdc.encode_bytes(tiny_codec24(), 0.1 * torch.randn(1, 1, 4000), 6.0, segment_seconds=0.05)
