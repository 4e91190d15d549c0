"""The .ecdc container as bytes: header, CRC-framed segment records, end marker and index (no torch).

Layout (all integers little-endian; full specification in docs/FORMAT.md)::

    prelude  b"NCDC" | version u8 | flags u8 | header length u32 | header JSON (zlib) | CRC32 u32
    record   kind u8 | flags u8 | items u16 | payload length u32 | frames u32
             | payload CRC32 u32 | codes CRC32 u32 | record-head CRC32 u32 | payload
    ...      one 'S' record per segment, then one 'E' (end) record, then one 'X' (index) record
    trailer  b"NCDX" | index record offset u64 | CRC32 u32 of the 12 bytes before it

Every length is covered by a CRC before it is trusted and capped by a fixed bound, so damaged or
hostile input raises `CorruptStream` naming the segment and byte offset, never a huge allocation.
A writer needs no seeking: the total length travels in the end record and the index holds offsets
counted while writing. Version-0 files of the reference tool (magic b"ECDC") are recognised here;
their payload is read by `neucodec.v0reader`.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import typing as tp
import zlib

from .errors import CorruptStream, DamagedStream, UnsupportedFormatVersion, option

MAGIC = b"NCDC"
V0_MAGIC = b"ECDC"
FORMAT_VERSION = 2  # the newest version read and written: 2 = 1 + envelope corrections in segments (FORMAT.md §6)
INDEX_MAGIC = b"NCDX"

KIND_SEGMENT = 0x53  # 'S'
KIND_END = 0x45  # 'E'
KIND_INDEX = 0x58  # 'X'
_KINDS = (KIND_SEGMENT, KIND_END, KIND_INDEX)

SEGMENT_PACKED = 0  # flags of a segment record: how its codes are coded
SEGMENT_LM = 1  # LM range coding, the LM in float32 (files of neucodec 0.1.0: machine-bound)
SEGMENT_LM_EXACT = 2  # LM range coding, the LM in exact arithmetic exact-v1 (neucodec 0.2.0)
SEGMENT_LM_EXACT2 = 3  # LM range coding, the LM in exact arithmetic exact-v2 (int8 products; the writer's)
LM_FLAGS = (SEGMENT_LM, SEGMENT_LM_EXACT, SEGMENT_LM_EXACT2)
ARITHMETIC_FLAGS = {"exact-v1": SEGMENT_LM_EXACT, "exact-v2": SEGMENT_LM_EXACT2}  # neucodec.exactlm's names
FLAG_ARITHMETIC = {flags: name for name, flags in ARITHMETIC_FLAGS.items()}
END_SOURCE_RESIDUE = 1  # flags of the end record, bit 0: its items field holds the source length mod 2^16

PRELUDE_ZHEADER = 1  # prelude flags bit 0: the header JSON is zlib-compressed with HEADER_DICTIONARY

#: zlib preset dictionary of compressed headers (FORMAT.md §2). Part of the format: never change it
#: (a different dictionary needs another prelude flag). A typical header and the strings of others.
HEADER_DICTIONARY = (
    b'"encodec_48khz""encodec_lm_48khz""encodec_lm_24khz""encodec_24khz""overlap""sd:"'
    b'{"bandwidth":6.0,"bits_per_code":10,"channels":1,"coder":{"arithmetic":"exact-v1","dtype":"float32",'
    b'"lm_threads":1,"model":"Categorical(perfect=False)","name":"constriction.queue.RangeEncoder",'
    b'"prob_grid":9.5367431640625e-07,"span_frames":75,"word":"uint32le"},"encoder":"neucodec 0.1.0",'
    b'"frame_rate":75,"groups":1,"hop_length":320,"layout":"stream","lm_fingerprint":null,'
    b'"lm_id":"neucodec_24khz","model_fingerprint":null,"model_id":"neucodec_24khz","n_q":8,'
    b'"sample_rate":24000,"scales":false,"segment_frames":750,"segment_length":null,'
    b'"segment_stride":null,"source_channels":1,"source_sample_rate":24000}')

MAX_HEADER_BYTES = 1 << 16
MAX_PAYLOAD_BYTES = 1 << 26  # 64 MiB: far above any real segment
MAX_SEGMENTS = 1 << 24

_PRELUDE = struct.Struct("<4sBBI")  # magic, version, flags, header length
_V0_PRELUDE = struct.Struct("!4sBI")  # reference: magic, version, JSON length (big-endian)
_HEAD = struct.Struct("<BBHIIII")  # kind, flags, items, payload length, frames, payload CRC, codes CRC
_RECORD = struct.Struct("<BBHIIIII")  # _HEAD + CRC32 of _HEAD
_END = struct.Struct("<QI")  # total length (samples per channel), segment count
_TRAILER = struct.Struct("<4sQI")
RECORD_HEAD_BYTES = _RECORD.size
TRAILER_BYTES = _TRAILER.size

Json = dict[str, tp.Any]


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()  # zlib's CRC-32 (reflected), one byte at a time
_CRC_OF_BYTE = {c: i for i, c in enumerate(_CRC_TABLE)}
_CRC_TOP = {c >> 24: i for i, c in enumerate(_CRC_TABLE)}  # the top bytes of the table are all different
REPAIR_BYTES = 1 << 20  # salvage looks for one damaged byte in payloads up to this size


def one_byte_fixes(data: bytes | bytearray, stored: int) -> list[tuple[int, int]]:
    """Every (position, xor mask) of a single damaged byte that, undone, gives `data` the CRC32
    `stored`. CRC-32 is linear: the damage's own CRC (zero start, no final xor) is the difference of
    the two CRCs, and a byte `v` followed by `m` zero bytes has the CRC `table[v]` run through `m`
    zero bytes, a step that can be run backwards; so the difference, run back one byte at a time,
    meets `table[v]` where the damage is. With the 32-bit check a wrong answer is rare (about
    255 * len(data) / 2^32), and the decoded codes have their own CRC besides."""
    diff = crc32(data) ^ stored
    out = []
    for back in range(len(data)):
        v = _CRC_OF_BYTE.get(diff)
        if v is not None and v:
            out.append((len(data) - 1 - back, v))
        i = _CRC_TOP[diff >> 24]
        diff = (diff ^ _CRC_TABLE[i]) << 8 | i
    return out


def repair(data: bytes, stored: int) -> tuple[bytes, int] | None:
    """`data` with the one damaged byte its CRC32 `stored` points to undone, and its position; None
    unless exactly one byte does it (or `data` is longer than REPAIR_BYTES)."""
    fixes = one_byte_fixes(data, stored) if len(data) <= REPAIR_BYTES else []
    if len(fixes) != 1:
        return None
    pos, mask = fixes[0]
    fixed = bytearray(data)
    fixed[pos] ^= mask
    return bytes(fixed), pos


def stream_bytes(end_offset: int, segments: int) -> int:
    """Size of a whole container whose end record starts at byte `end_offset`: the end record, the
    index record (8 bytes per segment) and the trailer follow it."""
    return end_offset + RECORD_HEAD_BYTES + _END.size + RECORD_HEAD_BYTES + 8 * segments + TRAILER_BYTES


def end_offset(stream_bytes: int, segments: int) -> int:
    """Inverse of `stream_bytes`: where the end record of a whole container starts."""
    return stream_bytes - (RECORD_HEAD_BYTES + _END.size + RECORD_HEAD_BYTES + 8 * segments + TRAILER_BYTES)


@dataclasses.dataclass
class SegmentRecord:
    """One segment as stored: its coded payload plus what frames it and checks it."""

    index: int  # 0-based position among the segments
    offset: int  # byte offset of the record head from the start of the container
    flags: int  # SEGMENT_PACKED or one of LM_FLAGS
    items: int  # independent sequences (coded channel groups) in the segment
    frames: int
    payload: bytes
    codes_crc: int  # CRC32 of the decoded codes, see `codes_crc32` in neucodec.entropy
    repaired: int | None = None  # salvage: the byte (offset) whose damage its CRCs located and undid


@dataclasses.dataclass
class EndRecord:
    length: int  # samples per channel at the codec rate
    segments: int
    frames: int  # total frames of all segments
    offset: int
    source_residue: int | None = None  # samples per channel of the original file, modulo 2^16


# ---------------------------------------------------------------- reading helpers
def read_exactly(fo: tp.BinaryIO, size: int, what: str) -> bytes:
    """Read `size` bytes (in bounded pieces, so a lying length cannot force a big allocation)."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        piece = fo.read(min(left, 1 << 20))
        if not piece:
            got = size - left
            raise CorruptStream(f"{what}: file truncated ({got} of {size} bytes present)")
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def read_upto(fo: tp.BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left > 0:
        piece = fo.read(left)
        if not piece:
            break
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def parse_head(raw: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int, int] | None:
    """The fields of a record head (kind, flags, items, payload length, frames, payload CRC, codes
    CRC), or None unless its CRC verifies, its kind is known and its length within the limit."""
    if len(raw) < RECORD_HEAD_BYTES:
        return None
    *head, stored = _RECORD.unpack_from(raw)
    if crc32(memoryview(raw)[: _HEAD.size]) != stored or head[0] not in _KINDS or head[3] > MAX_PAYLOAD_BYTES:
        return None
    return tp.cast(tuple[int, int, int, int, int, int, int], tuple(head))


@dataclasses.dataclass
class Prelude:
    """What the first bytes of a file say: its format version and header."""

    version: int
    header: Json
    size: int  # bytes consumed from the start of the container
    repaired: int | None = None  # salvage: the byte whose damage the header's CRC located and undid


def read_prelude(fo: tp.BinaryIO, repair_damage: bool = False) -> Prelude:
    """Read magic, version and header of a v1 (NCDC) or v0 (reference ECDC) file; validate them.

    `repair_damage` (salvage): one damaged byte of a v1 prelude (not in its length field) that the
    header's CRC locates is undone (`Prelude.repaired`) instead of failing."""
    first = read_upto(fo, 4)
    if len(first) == 0:
        raise CorruptStream("empty input: not an .ecdc file (0 bytes)")
    near = repair_damage and len(first) == 4 and sum(a != b for a, b in zip(first, MAGIC)) == 1
    if len(first) < 4 or first not in (MAGIC, V0_MAGIC) and not near:
        raise CorruptStream(f"not an .ecdc file: starts with {first[:4]!r}, expected {MAGIC!r} "
                            f"(or {V0_MAGIC!r} from the reference encodec tool)")
    if first == V0_MAGIC:
        rest = read_exactly(fo, _V0_PRELUDE.size - 4, "header at byte 4")
        _, version, size = _V0_PRELUDE.unpack(first + rest)
        if version != 0:
            raise UnsupportedFormatVersion(f"reference ECDC file of version {version}; only version 0 is known")
        if size > MAX_HEADER_BYTES:
            raise CorruptStream(f"header at byte 9: length {size} exceeds the limit of {MAX_HEADER_BYTES}")
        raw = read_exactly(fo, size, "header at byte 9")
        return Prelude(0, _parse_json(raw, 9), _V0_PRELUDE.size + size)
    rest = read_exactly(fo, _PRELUDE.size - 4, "header at byte 4")
    _, version, flags, size = _PRELUDE.unpack(first + rest)
    if not repair_damage:
        _check_version(version)
    if size > MAX_HEADER_BYTES:
        raise CorruptStream(f"header at byte {_PRELUDE.size}: length {size} exceeds the limit of "
                            f"{MAX_HEADER_BYTES} (file damaged)")
    raw = read_exactly(fo, size, f"header at byte {_PRELUDE.size}")
    (stored,) = struct.unpack("<I", read_exactly(fo, 4, f"header CRC at byte {_PRELUDE.size + size}"))
    repaired = None
    if crc32(first + rest + raw) != stored:
        data = first + rest + raw
        diff = (crc32(data) ^ stored).to_bytes(4, "little")
        fixed = (data, len(data) + next(k for k in range(4) if diff[k])) if sum(map(bool, diff)) == 1 else \
            repair(data, stored)
        if fixed is None or _PRELUDE.size - 4 <= fixed[1] < _PRELUDE.size:  # none, or in the length it was read by
            raise CorruptStream(f"header at byte {_PRELUDE.size}: CRC mismatch (file damaged)")
        if not repair_damage:
            raise CorruptStream(f"header at byte {_PRELUDE.size}: CRC mismatch (file damaged); one damaged byte, "
                                f"which {option('--salvage')} repairs")
        data, repaired = fixed
        first, rest, raw = data[:4], data[4: _PRELUDE.size], data[_PRELUDE.size:]
        _, version, flags, _ = _PRELUDE.unpack(first + rest)
    if first != MAGIC:
        raise CorruptStream(f"not an .ecdc file: starts with {first!r}, expected {MAGIC!r}")
    _check_version(version)
    if flags & ~PRELUDE_ZHEADER:
        raise UnsupportedFormatVersion(f"header flags {flags:#x} are not known to this neucodec; upgrade neucodec")
    if flags & PRELUDE_ZHEADER:
        raw = _inflate_header(raw, _PRELUDE.size)
    return Prelude(version, _parse_json(raw, _PRELUDE.size), _PRELUDE.size + size + 4, repaired)


def _check_version(version: int) -> None:
    if not 1 <= version <= FORMAT_VERSION:
        raise UnsupportedFormatVersion(
            f"format version {version} is not supported by this neucodec (reads versions 0 to "
            f"{FORMAT_VERSION}); upgrade neucodec" if version > FORMAT_VERSION else
            f"unknown format version {version}")


def _deflate_header(raw: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
    return c.compress(raw) + c.flush()


def _inflate_header(data: bytes, offset: int) -> bytes:
    """The JSON of a compressed header: at most MAX_HEADER_BYTES, one complete zlib stream."""
    if len(data) < 2 or not data[1] & 0x20:  # FLG.FDICT: made with the dictionary
        raise CorruptStream(f"header at byte {offset}: compressed header without the header dictionary (file damaged)")
    d = zlib.decompressobj(zdict=HEADER_DICTIONARY)
    try:
        raw = d.decompress(data, MAX_HEADER_BYTES)
    except zlib.error:
        raise CorruptStream(f"header at byte {offset}: not a valid compressed header (file damaged)") from None
    if d.unconsumed_tail or not d.eof or d.unused_data:
        raise CorruptStream(f"header at byte {offset}: compressed header is incomplete, too long or followed "
                            "by extra bytes (file damaged)")
    return raw


def _parse_json(raw: bytes, offset: int) -> Json:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptStream(f"header at byte {offset}: not valid UTF-8 JSON (file damaged)") from None
    if not isinstance(header, dict):
        raise CorruptStream(f"header at byte {offset}: expected a JSON object, got {type(header).__name__}")
    return header


class ContainerReader:
    """Sequential reader of the records after the prelude (works on pipes).

    Iterating yields `SegmentRecord`s in order and stops after the end record, which is then
    available as `.end`. `seek_segment(i)` uses the trailing index when the file is seekable.
    """

    def __init__(self, fo: tp.BinaryIO, prelude: Prelude, base: int = 0) -> None:
        self.fo = fo
        self.prelude = prelude
        self.base = base  # absolute file position of the magic (for seeking)
        self.position = prelude.size  # bytes consumed, relative to the magic
        self.next_index = 0
        self.end: EndRecord | None = None

    def _read_record_head(self) -> tuple[int, int, int, int, int, int, int]:
        where = f"segment {self.next_index} at byte {self.position}"
        raw = read_upto(self.fo, RECORD_HEAD_BYTES)
        if len(raw) < RECORD_HEAD_BYTES:
            reason = f"file truncated (record head has {len(raw)} of {RECORD_HEAD_BYTES} bytes; the end marker " \
                "is missing)"
            raise DamagedStream(f"{where}: {reason}", self.next_index, self.position, reason)
        *head, stored = _RECORD.unpack(raw)
        if crc32(raw[: _HEAD.size]) != stored:
            if self._past_segments(self.position):
                raise DamagedStream(f"end record at byte {self.position}: CRC mismatch in record head (file damaged)",
                                    None, self.position, "CRC mismatch in record head")
            raise DamagedStream(f"{where}: CRC mismatch in record head (file damaged)", self.next_index,
                                self.position, "CRC mismatch in record head")
        kind, flags, items, plen, frames, pcrc, ccrc = head
        if plen > MAX_PAYLOAD_BYTES:
            reason = f"payload length {plen} exceeds the limit of {MAX_PAYLOAD_BYTES}"
            raise DamagedStream(f"{where}: {reason}", self.next_index, self.position, reason)
        return kind, flags, items, plen, frames, pcrc, ccrc

    def _past_segments(self, position: int) -> bool:
        """Whether the trailing index (of a file that can seek) puts `position` after every segment."""
        try:
            offsets = self.read_index()
        except (CorruptStream, OSError, ValueError, OverflowError, struct.error):
            return False
        return offsets is not None and position > max(offsets, default=-1)

    def read_record(self) -> SegmentRecord | EndRecord:
        """The next record: a segment, or the end record (after which iteration stops)."""
        if self.end is not None:
            raise CorruptStream("read past the end record")
        start = self.position
        kind, flags, items, plen, frames, pcrc, ccrc = self._read_record_head()
        where = f"segment {self.next_index} at byte {start}" if kind != KIND_END else f"end record at byte {start}"
        segment = self.next_index if kind != KIND_END else None
        self.position += RECORD_HEAD_BYTES
        try:
            payload = read_exactly(self.fo, plen, where)
        except CorruptStream as e:
            raise DamagedStream(str(e), segment, start, "file truncated") from None
        self.position += plen
        if crc32(payload) != pcrc:
            raise DamagedStream(f"{where}: CRC mismatch (file damaged)", segment, start, "CRC mismatch")
        if kind == KIND_SEGMENT:
            if flags not in (SEGMENT_PACKED, *LM_FLAGS):
                raise UnsupportedFormatVersion(f"{where}: unknown coder flags {flags:#x}; upgrade neucodec")
            if self.next_index >= MAX_SEGMENTS:
                raise CorruptStream(f"{where}: more than {MAX_SEGMENTS} segments")
            record = SegmentRecord(self.next_index, start, flags, items, frames, payload, ccrc)
            self.next_index += 1
            return record
        if kind == KIND_END:
            if plen != _END.size:
                raise DamagedStream(f"end record at byte {start}: payload of {plen} bytes, expected {_END.size}",
                                    None, start, "bad end record")
            length, count = _END.unpack(payload)
            if count != self.next_index:
                reason = f"says {count} segments, found {self.next_index} (segments lost)"
                raise DamagedStream(f"end record at byte {start}: {reason}", None, start, reason)
            residue = items if flags & END_SOURCE_RESIDUE else None
            self.end = EndRecord(length, count, frames, start, residue)
            return self.end
        raise DamagedStream(f"{where}: unknown record kind {kind:#x} (file damaged)", segment, start,
                            f"unknown record kind {kind:#x}")

    def __iter__(self) -> tp.Iterator[SegmentRecord]:
        while self.end is None:
            record = self.read_record()
            if isinstance(record, SegmentRecord):
                yield record

    def read_index(self) -> list[int] | None:
        """Segment offsets from the trailing index, or None when the stream cannot seek or has none."""
        fo = self.fo
        try:
            if not fo.seekable():
                return None
            here = fo.tell()
            fo.seek(0, 2)
            total = fo.tell() - self.base
        except (OSError, AttributeError, ValueError):
            return None
        try:
            if total < self.prelude.size + TRAILER_BYTES:
                return None
            fo.seek(self.base + total - TRAILER_BYTES)
            raw = read_upto(fo, TRAILER_BYTES)
            magic, offset, stored = _TRAILER.unpack(raw)
            if magic != INDEX_MAGIC or crc32(raw[:12]) != stored:
                return None
            if not self.prelude.size <= offset <= total - TRAILER_BYTES - RECORD_HEAD_BYTES:
                raise CorruptStream(f"index at byte {total - TRAILER_BYTES}: offset {offset} outside the file")
            fo.seek(self.base + offset)
            head = read_upto(fo, RECORD_HEAD_BYTES)
            if len(head) < RECORD_HEAD_BYTES:
                raise CorruptStream(f"index at byte {offset}: truncated")
            *fields, hcrc = _RECORD.unpack(head)
            kind, _, _, plen, _, pcrc, _ = fields
            if crc32(head[: _HEAD.size]) != hcrc or kind != KIND_INDEX or plen % 8 or plen > MAX_PAYLOAD_BYTES:
                raise CorruptStream(f"index at byte {offset}: damaged record head")
            payload = read_exactly(fo, plen, f"index at byte {offset}")
            if crc32(payload) != pcrc:
                raise CorruptStream(f"index at byte {offset}: CRC mismatch (file damaged)")
            offsets = list(struct.unpack(f"<{plen // 8}Q", payload))
            if any(not self.prelude.size <= o < offset for o in offsets) or offsets != sorted(offsets):
                raise CorruptStream(f"index at byte {offset}: segment offsets outside the body")
            return offsets
        finally:
            fo.seek(here)

    def seek_segment(self, i: int, offsets: list[int]) -> None:
        """Position the reader at segment `i` (offsets from `read_index`)."""
        if not 0 <= i < len(offsets):
            raise IndexError(f"segment {i} out of range (file has {len(offsets)})")
        self.fo.seek(self.base + offsets[i])
        self.position = offsets[i]
        self.next_index = i
        self.end = None


# ---------------------------------------------------------------- writing
class ContainerWriter:
    """Writes prelude, segments, end record, index and trailer to a stream that need not seek."""

    def __init__(self, fo: tp.BinaryIO, header: Json, version: int = 1) -> None:
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(raw) > MAX_HEADER_BYTES:
            raise ValueError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
        if not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"cannot write format version {version}")
        packed = _deflate_header(raw)  # ~20-120 bytes instead of ~630 (FORMAT.md §2)
        prelude = _PRELUDE.pack(MAGIC, version, PRELUDE_ZHEADER, len(packed)) + packed
        self.fo = fo
        self.offsets: list[int] = []
        self.frames = 0
        self.position = 0
        self.closed = False
        self._write(prelude + struct.pack("<I", crc32(prelude)))

    def _write(self, data: bytes) -> None:
        self.fo.write(data)
        self.position += len(data)

    def _record(self, kind: int, flags: int, items: int, frames: int, payload: bytes, codes_crc: int) -> bytes:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        head = _HEAD.pack(kind, flags, items, len(payload), frames, crc32(payload), codes_crc)
        return head + struct.pack("<I", crc32(head)) + payload

    def write_segment(self, payload: bytes, frames: int, items: int, flags: int, codes_crc: int) -> None:
        """Append one segment record and flush, so a reader on a pipe gets it at once."""
        self.offsets.append(self.position)
        self.frames += frames
        self._write(self._record(KIND_SEGMENT, flags, items, frames, payload, codes_crc))
        flush = getattr(self.fo, "flush", None)
        if flush is not None:
            flush()

    def close(self, length: int, source_length: int | None = None) -> int:
        """Write the end record, the index and the trailer; returns bytes written.

        `length`: samples per channel at the codec rate; `source_length`, when known: of the original
        file at its own rate (stored modulo 2^16, enough to undo resampling's rounding).
        """
        flags, residue = (0, 0) if source_length is None else (END_SOURCE_RESIDUE, source_length & 0xFFFF)
        self._write(self._record(KIND_END, flags, residue, self.frames, _END.pack(length, len(self.offsets)), 0))
        index_offset = self.position
        index = struct.pack(f"<{len(self.offsets)}Q", *self.offsets)
        self._write(self._record(KIND_INDEX, 0, 0, 0, index, 0))
        trailer = _TRAILER.pack(INDEX_MAGIC, index_offset, 0)[:12]
        self._write(trailer + struct.pack("<I", crc32(trailer)))
        self.closed = True
        flush = getattr(self.fo, "flush", None)
        if flush is not None:
            flush()
        return self.position


def v0_header_bytes(header: Json) -> bytes:
    """A reference (version 0) header: b"ECDC", 0, big-endian JSON length, `json.dumps` JSON."""
    raw = json.dumps(header).encode("utf-8")
    return _V0_PRELUDE.pack(V0_MAGIC, 0, len(raw)) + raw
