"""Reading a container through damage: `SalvageReader` yields the intact segment records and, for
what it cannot read, `Lost` runs; it resynchronises after a damaged record head (the trailing index
when the stream can seek, else a scan for the next head whose CRC verifies) and repairs one damaged
byte that a CRC locates (`container.repair`). The strict reader is `container.ContainerReader`;
byte layout: docs/FORMAT.md §3, §8.
"""
from __future__ import annotations

import dataclasses
import re
import struct
import typing as tp

from .container import (
    _END,
    _HEAD,
    END_SOURCE_RESIDUE,
    KIND_END,
    KIND_INDEX,
    KIND_SEGMENT,
    LM_FLAGS,
    MAX_SEGMENTS,
    RECORD_HEAD_BYTES,
    SEGMENT_PACKED,
    ContainerReader,
    EndRecord,
    Prelude,
    SegmentRecord,
    crc32,
    one_byte_fixes,
    parse_head,
    read_upto,
    repair,
)
from .errors import CorruptStream


@dataclasses.dataclass
class Lost:
    """Consecutive segments that a `SalvageReader` could not read."""

    index: int  # the first of them
    count: int | None  # how many; None: all from `index` to the end of the stream (it is cut off)
    frames: int | None  # frames of the one segment lost, when its record head is intact; else None
    offset: int  # byte where the damage starts
    reason: str
    exact: bool = True  # False: `count` is an estimate from the bytes skipped (no index to say)
    final: bool = False  # nothing follows but the end record (when it is there)


class _Source:
    """A stream's bytes from `pos` on, read as needed (a pipe is fine), with look-ahead for scanning."""

    def __init__(self, fo: tp.BinaryIO, pos: int, base: int) -> None:
        self.fo, self.pos, self.base = fo, pos, base
        self.buf = bytearray()  # the bytes from `pos` on that have been read
        self.eof = False

    def _fill(self, n: int, ahead: bool = False) -> None:
        while len(self.buf) < n and not self.eof:
            want = n - len(self.buf)
            read1 = getattr(self.fo, "read1", None) if ahead else None
            piece = read1(max(want, 1 << 16)) if read1 is not None else self.fo.read(min(want, 1 << 20))
            if not piece:
                self.eof = True
            else:
                self.buf += piece

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes from `pos` (fewer at the end of the stream)."""
        self._fill(n)
        return bytes(self.buf[:n])

    def take(self, n: int) -> bytes | None:
        """`n` bytes from `pos`, consumed; None (and the rest consumed) when the stream ends first."""
        if n > len(self.buf):
            self.buf += read_upto(self.fo, n - len(self.buf))  # in bounded pieces
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos += len(data)
        return data if len(data) == n else None

    def seek(self, pos: int) -> None:
        self.fo.seek(self.base + pos)
        self.pos, self.buf, self.eof = pos, bytearray(), False

    def next_head(self) -> bool:
        """Move to the next byte after `pos` where a record head verifies (`parse_head`); False, at
        the end of the stream, when there is none."""
        self.take(1)
        while True:
            self._fill(len(self.buf) + (1 << 16), ahead=True)
            stop = max(0, len(self.buf) - RECORD_HEAD_BYTES + 1)  # candidates with a whole head read
            view = memoryview(self.buf)
            found = next((m.start() for m in _KIND_BYTE.finditer(self.buf, 0, stop)
                          if parse_head(view[m.start(): m.start() + RECORD_HEAD_BYTES]) is not None), None)
            view.release()
            drop = len(self.buf) if self.eof and found is None else stop if found is None else found
            del self.buf[:drop]
            self.pos += drop
            if found is not None:
                return True
            if self.eof:
                return False


_KIND_BYTE = re.compile(b"[SEX]")


class SalvageReader:
    """Sequential reader of the records after the prelude that goes on past damage (works on pipes).

    Iterating yields the intact `SegmentRecord`s and, in their place, `Lost` runs of segments: a
    record whose payload fails its CRC (its intact head gives its frames), or, after a damaged record
    head, the segments up to the next record head that verifies (found in the trailing index when the
    file can seek, else by scanning the bytes; then their count is estimated from the bytes skipped,
    or exact when an intact end record follows). A record head or payload with one damaged byte that
    its CRC locates (`repair`) is repaired instead (`SegmentRecord.repaired`): a head only when the
    payload it then frames verifies, a payload then checked again by its decoded codes' CRC.

    Afterwards `end` is the end record if it is intact (or repaired: `end_repaired`); `end_frames`
    and `end_residue` what an intact end record head says when its payload is damaged; `end_damage`
    what happened to the end record, if anything.
    """

    def __init__(self, fo: tp.BinaryIO, prelude: Prelude, base: int = 0) -> None:
        self.prelude, self.base = prelude, base
        self.src = _Source(fo, prelude.size, base)
        self.end: EndRecord | None = None
        self.end_frames: int | None = None
        self.end_residue: int | None = None
        self.end_damage: str | None = None
        self.end_repaired: int | None = None  # the byte of the end record whose damage was undone

    def _index(self) -> list[int] | None:
        reader = ContainerReader(self.src.fo, self.prelude, self.base)
        try:
            return reader.read_index()
        except (CorruptStream, OSError, ValueError, OverflowError, struct.error):
            return None

    def __iter__(self) -> tp.Iterator[SegmentRecord | Lost]:
        src = self.src
        index = self._index()
        i = 0
        sizes = 0  # bytes of the intact segment records read, for estimates
        intact = 0
        while True:
            start = src.pos
            raw = src.peek(RECORD_HEAD_BYTES)
            head = parse_head(raw)
            repaired = None
            if head is None and len(raw) == RECORD_HEAD_BYTES:
                head, repaired = self._repair_head(raw)
            if head is None and len(raw) < RECORD_HEAD_BYTES:
                self.end_damage = f"end record missing at byte {start} (file truncated)"
                if i < MAX_SEGMENTS:
                    yield Lost(i, None, None, start, "file truncated", final=True)
                return
            if head is not None:
                kind, flags, items, plen, frames, pcrc, ccrc = head
                if kind == KIND_END:
                    self.end_repaired = repaired
                    self._read_end(head)
                    if self.end is not None and self.end.segments > i:
                        yield Lost(i, min(self.end.segments - i, MAX_SEGMENTS), None, start,
                                   "segments missing before the end record", final=True)
                    return
                if kind == KIND_INDEX:
                    self.end_damage = f"end record missing before the index at byte {start}"
                    return
                if i >= MAX_SEGMENTS:
                    self.end_damage = f"more than {MAX_SEGMENTS} segments at byte {start}"
                    return
                src.take(RECORD_HEAD_BYTES)
                payload = src.take(plen)
                if payload is None:
                    self.end_damage = f"end record missing (file truncated in segment {i})"
                    yield Lost(i, None, frames, start, "file truncated", final=True)
                    return
                if crc32(payload) != pcrc:
                    fixed = repair(payload, pcrc)
                    if fixed is not None:
                        payload, repaired = fixed[0], start + RECORD_HEAD_BYTES + fixed[1]
                if crc32(payload) != pcrc:
                    yield Lost(i, 1, frames, start, "CRC mismatch")
                elif flags not in (SEGMENT_PACKED, *LM_FLAGS):
                    yield Lost(i, 1, frames, start, f"unknown coder flags {flags:#x}")
                else:
                    sizes += RECORD_HEAD_BYTES + plen
                    intact += 1
                    yield SegmentRecord(i, start, flags, items, frames, payload, ccrc, repaired)
                i += 1
                continue
            # a damaged record head: resynchronise on the next one that verifies
            reason = "CRC mismatch in record head"
            total = None  # segments in the stream, when the index says
            if index is not None:
                j = self._next_indexed(index, start)
                if j is not None:
                    yield Lost(i, max(1, j - i), None, start, reason)
                    i = max(j, i + 1)
                    continue
                if any(o > start for o in index):  # no later offset holds a record head: the index is stale
                    index = None
                    src.seek(start)
                else:  # past the last segment: find the end record by scanning
                    total, index = len(index), None
            if not src.next_head():
                self.end_damage = "end record not found (file damaged)"
                yield Lost(i, None, None, start, reason, final=True)
                return
            head = parse_head(src.peek(RECORD_HEAD_BYTES))
            if head is None or head[0] == KIND_SEGMENT:
                skipped = src.pos - start
                count = max(1, round(skipped / (sizes / intact))) if intact else 1
                yield Lost(i, min(count, MAX_SEGMENTS - i), None, start, reason, exact=False)
                i += count
                continue
            # nothing but the end of the stream follows: the end record or the index says how many segments
            if head[0] == KIND_END:
                self._read_end(head)
                total = self.end.segments if self.end is not None else total
            else:
                total = head[3] // 8 if total is None else total
                self.end_damage = f"end record at byte {start} damaged or missing"
            if total is None:
                yield Lost(i, 1, None, start, reason, exact=False, final=True)
            elif total > i:
                yield Lost(i, min(total - i, MAX_SEGMENTS), None, start, reason, final=True)
            return

    def _repair_head(self, raw: bytes) -> tuple[tuple[int, int, int, int, int, int, int] | None, int | None]:
        """A damaged record head at the current position with one damaged byte undone, and that byte's
        offset, when exactly one such head verifies with the payload that follows it; else (None, None)."""
        body, stored = raw[: _HEAD.size], int.from_bytes(raw[_HEAD.size:], "little")
        candidates = []
        for pos, mask in one_byte_fixes(body, stored):
            fixed = bytearray(body)
            fixed[pos] ^= mask
            candidates.append((bytes(fixed) + raw[_HEAD.size:], pos))
        diff = (crc32(body) ^ stored).to_bytes(4, "little")  # the damage in the stored CRC itself
        if sum(map(bool, diff)) == 1:
            candidates.append((body + crc32(body).to_bytes(4, "little"), _HEAD.size + next(k for k in range(4)
                                                                                             if diff[k])))
        found = []
        for fixed_head, pos in candidates:
            head = parse_head(fixed_head)
            if head is not None:
                data = self.src.peek(RECORD_HEAD_BYTES + head[3])
                if len(data) == RECORD_HEAD_BYTES + head[3] and crc32(data[RECORD_HEAD_BYTES:]) == head[5]:
                    found.append((head, self.src.pos + pos))
        return found[0] if len(found) == 1 else (None, None)

    def _next_indexed(self, index: list[int], start: int) -> int | None:
        """The first segment after byte `start` whose record head, where the index puts it, verifies;
        the source is left there. None (the source anywhere) when there is none."""
        for j, offset in enumerate(index):
            if offset > start:
                self.src.seek(offset)
                if parse_head(self.src.peek(RECORD_HEAD_BYTES)) is not None:
                    return j
        return None

    def _read_end(self, head: tuple[int, int, int, int, int, int, int]) -> None:
        """The end record whose (intact) head is at the current position."""
        kind, flags, items, plen, frames, pcrc, _ = head
        start = self.src.pos
        self.src.take(RECORD_HEAD_BYTES)
        payload = self.src.take(plen)
        self.end_frames = frames
        self.end_residue = items if flags & END_SOURCE_RESIDUE else None
        if payload is not None and crc32(payload) != pcrc and (fixed := repair(payload, pcrc)) is not None:
            payload, self.end_repaired = fixed[0], start + RECORD_HEAD_BYTES + fixed[1]
        if payload is None:
            self.end_damage = f"end record at byte {start}: file truncated"
        elif crc32(payload) != pcrc or plen != _END.size:
            self.end_damage = f"end record at byte {start}: CRC mismatch"
        else:
            length, count = _END.unpack(payload)
            self.end = EndRecord(length, count, frames, start, self.end_residue)
