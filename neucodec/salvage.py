"""Damaged .ecdc streams: which segments are lost, when, the stream's length, and the messages (no torch).

A strict reader stops at the first damage with a `DamagedStream`; `located` names the damaged span in
seconds and the option that decodes around it. `Salvage` goes on: it turns a
`container_salvage.SalvageReader`'s records into the intact segments and, in place of the lost ones,
`LostPiece`s with their frame counts, so that `reader.decode_stream(..., salvage=True)` can fill them
and keep the output's length and timing; `read_info(..., salvage=True)` does the same without decoding.
Each lost run is described once, in seconds (`report`). Byte layout and rules: docs/FORMAT.md §3, §8.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from . import container, container_salvage
from .audio_io import expected_length
from .errors import CorruptStream, DamagedStream, option
from .streamspec import OVERLAP, StreamInfo

Report = tp.Callable[[str], None]


@dataclasses.dataclass
class LostPiece:
    """One lost segment as the decoder fills it."""

    index: int  # the segment's position in the stream
    frames: int  # code frames it held


def seconds(x: float) -> str:
    """A time in a message: one decimal where that is exact, else two."""
    return f"{x:.1f}" if abs(10 * x - round(10 * x)) < 1e-6 else f"{x:.2f}"


def segment_span(i: int, info: StreamInfo) -> tuple[float, float]:
    """Seconds covered by segment `i` of a stream whose earlier segments are all full."""
    if info.layout == OVERLAP:
        a, n = i * (info.segment_stride or 0), info.segment_length or 0
    else:
        n = info.segment_frames * info.hop_length
        a = i * n
    b = a + n if info.length is None else min(a + n, info.length)
    return a / info.sample_rate, b / info.sample_rate


def located(e: DamagedStream, info: StreamInfo) -> DamagedStream:
    """A strict reader's `e` with the damaged span in seconds and the option that decodes around it."""
    if e.located:
        return e
    if e.segment is None:
        where, detail = "at the end of the stream", str(e).replace(" (file damaged)", "")
    else:
        a, b = segment_span(e.segment, info)
        truncated = e.reason.startswith("file truncated")
        where = f"from {seconds(a)} s on" if truncated else f"at {seconds(a)}–{seconds(b)} s"
        detail = f"segment {e.segment} at byte {e.offset}: {e.reason}"
    return DamagedStream(f"damaged {where} ({detail}); decode what is intact with {option('--salvage')}",
                         e.segment, e.offset, e.reason, located=True)


def payload_bound(info: StreamInfo, items: int, frames: int) -> int:
    """More bytes than any segment of `frames` frames can hold."""
    corrections = 0 if info.envelope is None else 4 * items * info.channels * 1024 * frames  # far above any real one
    return 4 * items * info.scales + items * info.n_q * frames * 4 + corrections + 64


def shape_problem(record: container.SegmentRecord, info: StreamInfo) -> str | None:
    """What makes an intact record impossible for this header, or None."""
    G = info.groups
    if record.items != G:
        return f"{record.items} channel groups, header says {G}"
    if not 1 <= record.frames <= info.segment_frames:
        return f"{record.frames} frames, segments hold at most {info.segment_frames}"
    if len(record.payload) > payload_bound(info, G, record.frames) or (info.scales and len(record.payload) < 4 * G):
        return f"payload of {len(record.payload)} bytes is impossible for {record.frames} frames"
    return None


class Salvage:
    """The segments of a damaged stream: intact `SegmentRecord`s (some repaired: one damaged byte
    that the record's CRCs locate is undone) and, for the lost ones, `LostPiece`s whose frames keep
    the timing (a full segment each, the frames an intact record head gives, or what the end record
    leaves for the last ones). Counts `segments`, `frames` and `lm_segments` (lost ones included)
    into `info`; `finish` gives the length."""

    def __init__(self, reader: container_salvage.SalvageReader, info: StreamInfo, report: Report | None = None) -> None:
        self.reader, self.info = reader, info
        self.report = report or (lambda line: None)
        self.lines: list[str] = []  # every line reported
        self.estimated = 0  # lost runs whose segment count is an estimate
        self.last_frames = 0  # of the last segment so far, intact or lost
        self.starts: dict[int, int] = {}  # first frame of each intact segment read (for `lost_record`)

    def _say(self, line: str) -> None:
        self.lines.append(line)
        self.report(line)

    def __iter__(self) -> tp.Iterator[container.SegmentRecord | LostPiece]:
        info = self.info
        if self.reader.prelude.repaired is not None:
            self._say(f"repaired one damaged byte at byte {self.reader.prelude.repaired} (header): its checksum "
                      "locates it")
        for item in self.reader:
            if isinstance(item, container.SegmentRecord):
                problem = shape_problem(item, info)
                if problem is None:
                    if item.repaired is not None:
                        self._repaired(item)
                    self.starts[item.index] = info.frames
                    info.segments += 1
                    info.frames += item.frames
                    info.lm_segments += item.flags in container.LM_FLAGS
                    self.last_frames = item.frames
                    yield item
                    continue
                item = container_salvage.Lost(item.index, 1, None, item.offset, problem)
            yield from self._lost(item)

    def _lost(self, lost: container_salvage.Lost) -> tp.Iterator[LostPiece]:
        info = self.info
        frames = self._frames(lost)
        self.estimated += not lost.exact
        start = info.frames
        pieces = [LostPiece(lost.index + k, f) for k, f in enumerate(frames)]
        for p in pieces:
            info.segments += 1
            info.frames += p.frames
            self.last_frames = p.frames
        self._describe(lost.index, len(pieces), start, frames, lost, unknown_tail=lost.count is None
                       or len(pieces) < lost.count)
        yield from pieces

    def _repaired(self, record: container.SegmentRecord) -> None:
        info = self.info
        sr, hop = info.sample_rate, info.hop_length
        a = record.index * (info.segment_stride or 0) if info.layout == OVERLAP else info.frames * hop
        self._say(f"repaired one damaged byte at byte {record.repaired} (segment {record.index}, "
                  f"{seconds(a / sr)}–{seconds((a + record.frames * hop) / sr)} s): its checksums locate it")

    def lost_record(self, record: container.SegmentRecord, reason: str) -> LostPiece:
        """An intact record whose payload could not be decoded (its frames were counted when read)."""
        start = self.starts.pop(record.index, 0)
        lost = container_salvage.Lost(record.index, 1, record.frames, record.offset, reason)
        self._describe(record.index, 1, start, [record.frames], lost, unknown_tail=False)
        return LostPiece(record.index, record.frames)

    def _frames(self, lost: container_salvage.Lost) -> list[int]:
        """The frames of each segment of a lost run."""
        info, sf = self.info, self.info.segment_frames
        if lost.frames is not None and 1 <= lost.frames <= sf and lost.count in (1, None):
            return [lost.frames]
        count = lost.count
        if not lost.final:
            return [sf] * (count or 0)
        end = self.reader.end
        if info.layout == OVERLAP and end is not None and count is not None:
            layout = info.layout_of(end.length) if end.length <= (lost.index + count + 1) * sf * info.hop_length \
                else []
            if len(layout) == lost.index + count:
                return [s.frames for s in layout[lost.index:]]
        total = end.frames if end is not None else self.reader.end_frames
        rest = None if total is None else total - info.frames
        if rest is not None and count is not None and 0 < rest <= (count + (not lost.exact)) * sf:
            n = count if lost.exact and rest > (count - 1) * sf else -(-rest // sf)
            return [sf] * (n - 1) + [rest - (n - 1) * sf]
        return [sf] * max(0, (count or 0) - 1)  # the last one's frames are unknown: it is left out

    def _describe(self, index: int, n: int, start: int, frames: list[int], lost: container_salvage.Lost,
                  unknown_tail: bool) -> None:
        info = self.info
        sr, hop = info.sample_rate, info.hop_length
        if info.layout == OVERLAP:
            a = index * (info.segment_stride or 0)
            b = a + ((n - 1) * (info.segment_stride or 0) + frames[-1] * hop if n else 0)
        else:
            a = start * hop
            b = a + sum(frames) * hop
        if n == 0:
            line = f"the stream breaks off at byte {lost.offset} after {seconds(a / sr)} s ({lost.reason}): " \
                "what followed, if anything, is lost"
        else:
            which = f"segment {index} at byte {lost.offset}" if n == 1 else \
                f"segments {index}–{index + n - 1} from byte {lost.offset}" if lost.exact else \
                f"about {n} segments from byte {lost.offset}"
            line = f"lost {seconds(a / sr)}–{seconds(b / sr)} s ({which}: {lost.reason}); filled with silence"
            if unknown_tail:
                line += "; what followed is lost too"
        self._say(line)

    def finish(self) -> int:
        """The stream's length: the end record's when it is intact and fits the segments, else what
        the segments read give. Fills in `info.length`, `source_length` and `bytes`."""
        info, reader = self.info, self.reader
        sf, hop, sr = info.segment_frames, info.hop_length, info.sample_rate
        if info.layout == OVERLAP:
            derived = (info.segments - 1) * (info.segment_stride or 0) + self.last_frames * hop if info.segments else 0
        else:
            derived = info.frames * hop
        end, length = reader.end, derived
        if end is not None:
            slack = self.estimated * sf
            fits = end.length <= derived + (1 + self.estimated) * sf * hop
            expected = sum(s.frames for s in info.layout_of(end.length)) if fits and end.length else 0
            if fits and abs(expected - info.frames) <= slack:
                length = end.length
            else:
                self._say(f"end record at byte {end.offset} says {seconds(end.length / sr)} s, but the segments "
                          f"hold {seconds(derived / sr)} s: the length is taken from the segments")
        elif reader.end_damage:
            residue = reader.end_residue
            if residue is not None and info.layout != OVERLAP and info.source_sample_rate == sr:
                pinned = derived - (derived - residue) % 0x10000  # the residue says where in the last frame
                if derived - hop < pinned <= derived:
                    length = info.source_length = pinned
            self._say(f"{reader.end_damage}; the length ({seconds(length / sr)} s) is taken from the segments read")
        if reader.end_repaired is not None:
            self._say(f"repaired one damaged byte at byte {reader.end_repaired} (end record): its checksums "
                      "locate it")
        info.length = length
        if end is not None and length == end.length and end.source_residue is not None:
            info.source_length = _source_length(length, end.source_residue, info)
        info.bytes = container.stream_bytes(end.offset, info.segments) if end is not None else reader.src.pos
        return length


def _source_length(length: int, residue: int, info: StreamInfo) -> int | None:
    """The original file's length from the codec-rate length and the end record's residue (as a
    strict reader finds it), or None when they do not fit together."""
    near = expected_length(length, info.sample_rate, info.source_sample_rate)
    diff = (residue - near + 0x8000) % 0x10000 - 0x8000
    if abs(diff) > 1 + -(-info.source_sample_rate // info.sample_rate) or near + diff < 0:
        return None
    return near + diff


def read_info(fi: tp.BinaryIO) -> StreamInfo:
    """`probe.read_info` of a stream that may be damaged: the totals (length, segments, bytes) as a
    salvage decode finds them, without decoding audio."""
    prelude = container.read_prelude(fi, repair_damage=True)
    info = _header_info(prelude)
    if prelude.version == 0:
        return info
    salvage = Salvage(container_salvage.SalvageReader(fi, prelude), info)
    for _ in salvage:
        pass
    salvage.finish()
    return info


def read_header(fi: tp.BinaryIO) -> StreamInfo:
    """`probe.read_header` of a stream that may be damaged (one damaged byte in its header repaired)."""
    return _header_info(container.read_prelude(fi, repair_damage=True))


def _header_info(prelude: container.Prelude) -> StreamInfo:
    from .probe import v0_info

    return v0_info(prelude.header) if prelude.version == 0 else StreamInfo.from_header(prelude.header, prelude.version)


def in_file(e: DamagedStream, name: str, fi: tp.BinaryIO | None = None) -> DamagedStream:
    """`e` as a decode of the file `name` reports it: named, its span located (the header read again
    from `fi`, which must seek, where the reader that raised it had not)."""
    if not e.located and fi is not None:
        try:
            fi.seek(0)
            prelude = container.read_prelude(fi)
            e = located(e, StreamInfo.from_header(prelude.header, prelude.version))
        except (OSError, ValueError, CorruptStream):
            pass
    return DamagedStream(f"{name}: {e}", e.segment, e.offset, e.reason, located=e.located)
