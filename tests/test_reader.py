"""Streaming reader: models named in the header, segment geometry, corruption -> one-line errors."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _bitstream import tiny_codec24, tiny_codec48
from neucodec import container, ecdc, reader
from neucodec.errors import CorruptStream, ModelMismatch, NeucodecError, UnsupportedFormatVersion
from neucodec.weights import save_release


@pytest.fixture(scope="module")
def c24():
    return tiny_codec24()


def test_source_length_residue_is_checked(c24) -> None:
    """The end record's residue restores the 44.1 kHz length; one that cannot fit is damage."""
    wav = 0.1 * torch.randn(1, 1, 24000)
    data = bytearray(ecdc.encode_bytes(c24, wav, 1.5, source_sample_rate=44100, source_length=lambda: 44101))
    assert ecdc.decode_bytes(bytes(data), c24)[0].source_length == 44101
    end = container.end_offset(reader.read_info(io.BytesIO(bytes(data))).bytes, 1)  # one segment
    assert data[end] == container.KIND_END and data[end + 1] == container.END_SOURCE_RESIDUE
    data[end + 2: end + 4] = (44101 + 9 & 0xFFFF).to_bytes(2, "little")
    data[end + 20: end + 24] = container.crc32(bytes(data[end: end + 20])).to_bytes(4, "little")
    with pytest.raises(CorruptStream, match=f"end marker at byte {end}: original length"):
        ecdc.decode_bytes(bytes(data), c24)


@pytest.mark.parametrize("T", [47520 + 100, 47520 * 2 + 100, 47520 * 2 + 479, 47520 * 2 + 480])
def test_segmented_lengths_in_the_last_overlap(T: int) -> None:
    """A 48 kHz stream whose length ends within the overlap of its last two segments: the one before
    the last is shorter than a full segment, and the end record's check counts its frames so."""
    c48 = tiny_codec48()
    wav = 0.1 * torch.randn(1, 2, T)
    info, audio = ecdc.decode_bytes(ecdc.encode_bytes(c48, wav, 6.0), c48)
    assert audio.shape == wav.shape and info.frames == sum(s.frames for s in c48.segments(T))
    assert torch.allclose(audio, c48.decode(c48.encode(wav, 6.0)), atol=1e-5)


def test_read_header_names_the_model(c24) -> None:
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 2400), 6.0)
    info = reader.read_header(io.BytesIO(data))
    assert (info.model_id, info.length, info.segments) == ("tiny24", None, 0)
    v0 = container.v0_header_bytes({"m": "encodec_48khz", "al": 3000, "nc": 2, "lm": False})
    assert reader.read_header(io.BytesIO(v0)).model_id == "encodec_48khz"


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
    records_reader = container.ContainerReader(fo, container.read_prelude(fo))
    records = list(records_reader)
    cases = {
        "empty": (b"", "empty"),
        "magic": (b"XXXX" + data[4:], "not an .ecdc file"),
        "version": (data[:4] + b"\x09" + data[5:], "version 9"),
        "truncated": (data[: records[2].offset + 30], f"segment 2 at byte {records[2].offset}"),
        "flip": (data[: records[1].offset + 40] + bytes([data[records[1].offset + 40] ^ 4])
                 + data[records[1].offset + 41:], f"segment 1 at byte {records[1].offset}: CRC mismatch"),
        "no end": (data[: records_reader.end.offset], "end marker is missing"),  # type: ignore[union-attr]
    }
    for _name, (bad, match) in cases.items():
        with pytest.raises(CorruptStream, match=match):
            ecdc.decode_bytes(bad, c24)
        with pytest.raises(CorruptStream):
            reader.read_info(io.BytesIO(bad))
    with pytest.raises(UnsupportedFormatVersion):
        ecdc.decode_bytes(cases["version"][0], c24)


def test_header_that_lies_about_length(c24) -> None:
    data = bytearray(_file(c24))
    fo = io.BytesIO(bytes(data))
    records_reader = container.ContainerReader(fo, container.read_prelude(fo))
    list(records_reader)
    end = records_reader.end
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
