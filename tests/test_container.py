"""Container framing: round trip, pipes, index, and every corruption class -> CorruptStream with a position."""
from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _bitstream import Pipe
from neucodec import container as C
from neucodec.errors import CorruptStream, UnsupportedFormatVersion

HEADER = {"model_id": "m", "n_q": 8}


def build(payloads: list[bytes], length: int = 1234) -> bytes:
    buf = io.BytesIO()
    w = C.ContainerWriter(buf, HEADER)
    for i, p in enumerate(payloads):
        w.write_segment(p, frames=10 + i, items=1, flags=C.SEGMENT_PACKED, codes_crc=i)
    w.close(length)
    return buf.getvalue()


def read_all(data: bytes) -> tuple[C.Prelude, list[C.SegmentRecord], C.EndRecord]:
    fo = io.BytesIO(data)
    prelude = C.read_prelude(fo)
    reader = C.ContainerReader(fo, prelude)
    records = list(reader)
    assert reader.end is not None
    return prelude, records, reader.end


def test_round_trip_and_index() -> None:
    payloads = [b"abc", b"", bytes(range(256)) * 3]
    data = build(payloads)
    prelude, records, end = read_all(data)
    assert prelude.header == HEADER and prelude.version == 1
    assert [r.payload for r in records] == payloads
    assert [r.frames for r in records] == [10, 11, 12] and [r.codes_crc for r in records] == [0, 1, 2]
    assert (end.length, end.segments, end.frames) == (1234, 3, 33)
    fo = io.BytesIO(data)
    reader = C.ContainerReader(fo, C.read_prelude(fo))
    offsets = reader.read_index()
    assert offsets == [r.offset for r in records]
    reader.seek_segment(2, offsets)
    rec = reader.read_record()
    assert isinstance(rec, C.SegmentRecord) and rec.index == 2 and rec.payload == payloads[2]


def test_pipe_reading() -> None:
    data = build([b"x" * 100, b"y"])
    fo = Pipe(data)
    reader = C.ContainerReader(fo, C.read_prelude(fo))  # type: ignore[arg-type]
    assert [r.payload for r in reader] == [b"x" * 100, b"y"]
    assert reader.read_index() is None


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"RIFF....WAVE", "not an .ecdc file"),
    (b"NC", "not an .ecdc file"),
])
def test_not_ecdc(data: bytes, match: str) -> None:
    with pytest.raises(CorruptStream, match=match):
        C.read_prelude(io.BytesIO(data))


def test_unknown_version() -> None:
    data = bytearray(build([b"a"]))
    data[4] = 7
    with pytest.raises(UnsupportedFormatVersion, match="version 7"):
        C.read_prelude(io.BytesIO(bytes(data)))



def _prelude(flags: int, header: bytes) -> bytes:
    head = struct.pack("<4sBBI", C.MAGIC, 1, flags, len(header)) + header
    return head + struct.pack("<I", C.crc32(head))


def test_headers_are_compressed_and_plain_ones_still_read() -> None:
    import json
    import zlib

    header = {"model_id": "neucodec_24khz", "n_q": 8, "coder": None, "layout": "stream"}
    data = build([b"a"])
    assert data[5] == C.PRELUDE_ZHEADER
    buf = io.BytesIO()
    C.ContainerWriter(buf, header)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert struct.unpack("<I", buf.getvalue()[6:10])[0] < len(raw) / 2
    assert C.read_prelude(io.BytesIO(buf.getvalue())).header == header
    assert C.read_prelude(io.BytesIO(_prelude(0, raw))).header == header  # files before compressed headers
    with pytest.raises(UnsupportedFormatVersion, match="flags 0x3"):
        C.read_prelude(io.BytesIO(_prelude(3, C._deflate_header(raw))))
    packed = C._deflate_header(raw)
    bomb = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, C.HEADER_DICTIONARY)
    for bad in (packed[:-3], packed + b"x", b"\x78\x9c" + bytes(20), zlib.compress(raw),  # no/other dictionary
                bomb.compress(b" " * (C.MAX_HEADER_BYTES + 1)) + bomb.flush()):
        with pytest.raises(CorruptStream, match="header at byte 10"):
            C.read_prelude(io.BytesIO(_prelude(1, bad)))


def test_format_md_holds_the_header_dictionary() -> None:
    """The preset dictionary is part of the format: FORMAT.md prints it byte for byte."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    block = text.split("<!-- header dictionary -->\n```\n", 1)[1].split("\n```", 1)[0]
    assert block.replace("\n", "").encode() == C.HEADER_DICTIONARY

def test_truncations_name_a_position() -> None:
    data = build([b"a" * 50, b"b" * 50])
    for cut in range(len(data) - C.TRAILER_BYTES - 8 * 2 - C.RECORD_HEAD_BYTES - 12):
        with pytest.raises(CorruptStream) as e:
            read_all(data[:cut])
        assert "\n" not in str(e.value)
        if cut > 30:
            assert "byte" in str(e.value)


def test_bit_flip_in_payload_reports_segment() -> None:
    data = bytearray(build([b"a" * 50, b"b" * 50]))
    _, records, _ = read_all(bytes(data))
    data[records[1].offset + C.RECORD_HEAD_BYTES + 3] ^= 0x10
    with pytest.raises(CorruptStream, match=f"segment 1 at byte {records[1].offset}: CRC mismatch"):
        read_all(bytes(data))


def test_lying_length_is_caught_before_allocation() -> None:
    data = bytearray(build([b"a" * 50]))
    _, records, _ = read_all(bytes(data))
    off = records[0].offset
    struct.pack_into("<I", data, off + 4, 0xFFFFFFF0)  # payload length field
    with pytest.raises(CorruptStream, match="record head"):
        read_all(bytes(data))
    # a consistent-CRC head with a huge length is refused by the bound
    head = struct.pack("<BBHIIII", C.KIND_SEGMENT, 0, 1, C.MAX_PAYLOAD_BYTES + 1, 1, 0, 0)
    data[off: off + C.RECORD_HEAD_BYTES] = head + struct.pack("<I", C.crc32(head))
    with pytest.raises(CorruptStream, match="exceeds the limit"):
        read_all(bytes(data))


def test_end_marker_counts_segments() -> None:
    good = build([b"a", b"b"])
    _, records, _ = read_all(good)
    # drop segment 1 entirely: the end record then disagrees with the count
    start, stop = records[1].offset, records[1].offset + C.RECORD_HEAD_BYTES + 1
    with pytest.raises(CorruptStream, match="segments lost"):
        read_all(good[:start] + good[stop:])


def test_end_record_source_residue() -> None:
    """Bit 0 of the end record's flags: its items field holds the source length modulo 2^16."""
    assert read_all(build([b"a"]))[2].source_residue is None  # as every file before neucodec 0.5.0
    buf = io.BytesIO()
    w = C.ContainerWriter(buf, HEADER)
    w.write_segment(b"a", frames=10, items=1, flags=C.SEGMENT_PACKED, codes_crc=0)
    w.close(1234, source_length=3 * 65536 + 4321)
    assert read_all(buf.getvalue())[2].source_residue == 4321


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_sample(data: st.DataObject) -> None:
    """Random mutations of a valid file: only CorruptStream, or a valid read."""
    base = bytearray(build([b"a" * 20, b"\x00" * 7, b"zz"]))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "byte"]))
        pos = data.draw(st.integers(0, max(0, len(base) - 1)))
        if op == "flip" and base:
            base[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del base[pos:]
        elif op == "insert":
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif base:
            base[pos] = data.draw(st.integers(0, 255))
    try:
        read_all(bytes(base))
    except CorruptStream as e:
        assert "\n" not in str(e)
