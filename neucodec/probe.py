"""An .ecdc stream's header and totals, checked, without decoding it and without torch: `read_header`,
`read_info` (what `neucodec info` prints), for neucodec's files and the reference encodec tool's
version-0 files, and a pipe that can be read again from its first byte once its header is read
(`Recorded`). `neucodec.reader` decodes; byte layout: docs/FORMAT.md.
"""
from __future__ import annotations

import io
import math
import struct
import typing as tp

from . import container
from .audio_io import expected_length
from .errors import CorruptStream
from .streamspec import OVERLAP, STREAM, StreamInfo

MODELS = {"encodec_24khz": (24000, 1, False), "encodec_48khz": (48000, 2, True)}  # rate, channels, segmented
HOP = 320  # samples per code frame of both reference models


def read_header(fi: tp.BinaryIO) -> StreamInfo:
    """What the header of a stream (any version) says, checked; the totals are not read."""
    prelude = container.read_prelude(fi)
    return v0_info(prelude.header) if prelude.version == 0 else StreamInfo.from_header(prelude.header, prelude.version)


def read_info(fi: tp.BinaryIO) -> StreamInfo:
    """Header plus totals (length, segments, bytes), checking every CRC, without decoding audio."""
    prelude = container.read_prelude(fi)
    if prelude.version == 0:
        return v0_info(prelude.header)
    info = StreamInfo.from_header(prelude.header, prelude.version)
    info.header_bytes = prelude.size
    reader = container.ContainerReader(fi, prelude)
    for record in reader:
        info.payload_bytes += len(record.payload)
        if record.items != info.groups or not 1 <= record.frames <= info.segment_frames:
            raise CorruptStream(f"segment {record.index} at byte {record.offset}: shape does not fit the header")
        info.segments += 1
        info.frames += record.frames
        info.lm_segments += record.flags in container.LM_FLAGS
        if info.envelope is not None:
            scales = 4 * info.groups * info.scales
            info.envelope_bytes += 4 + _correction_size(record.payload[scales:], f"segment {record.index} at byte "
                                                        f"{record.offset}")
    _check_end(reader, info)
    return info


def _correction_size(payload: bytes, where: str) -> int:
    """Bytes of the envelope corrections at the start of `payload` (a segment's, after its scales)."""
    (size,) = struct.unpack("<I", payload[:4]) if len(payload) >= 4 else (-1,)
    if size < 0 or size % 4 or 4 + size > len(payload):
        raise CorruptStream(f"{where}: envelope correction of a bad length (file damaged)")
    return size


def _check_end(reader: container.ContainerReader, info: StreamInfo) -> int:
    """The stream's length, after checking the end record against the segments read (and the
    original length its residue gives); fills in `info.length`, `source_length` and `bytes`."""
    end = tp.cast(container.EndRecord, reader.end)
    length = end.length
    expected = sum(s.frames for s in info.layout_of(length)) if length else 0
    if end.frames != info.frames or expected != info.frames:
        raise CorruptStream(f"end marker at byte {end.offset}: says {length} samples ({expected} frames) but the "
                            f"segments hold {info.frames} frames (file damaged)")
    info.length = length
    if end.source_residue is not None:
        info.source_length = _source_length(length, end.source_residue, info, end.offset)
    info.bytes = container.stream_bytes(end.offset, info.segments)
    return length


def _source_length(length: int, residue: int, info: StreamInfo, offset: int) -> int:
    """The original file's length: the resampled codec-rate `length` brought back to the source rate
    is within a few samples of it, and `residue` (the length modulo 2^16) says which (FORMAT.md §3)."""
    near = expected_length(length, info.sample_rate, info.source_sample_rate)
    diff = (residue - near + 0x8000) % 0x10000 - 0x8000
    if abs(diff) > 1 + -(-info.source_sample_rate // info.sample_rate) or near + diff < 0:
        raise CorruptStream(f"end marker at byte {offset}: original length {residue} (mod 65536) does not match "
                            f"{length} samples at {info.sample_rate} Hz (file damaged)")
    return near + diff


def v0_info(h: dict[str, tp.Any]) -> StreamInfo:
    """The `StreamInfo` of a reference header, checked."""
    name = h.get("m")
    if name not in MODELS:
        raise CorruptStream(f"reference .ecdc header names an unknown model {str(name)[:40]!r}")
    al, nc, use_lm = h.get("al"), h.get("nc"), h.get("lm")
    if not isinstance(al, int) or isinstance(al, bool) or not 0 <= al < 1 << 40:
        raise CorruptStream(f"reference .ecdc header: bad audio length {str(al)[:40]!r}")
    if not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= 32:
        raise CorruptStream(f"reference .ecdc header: bad number of codebooks {str(nc)[:40]!r}")
    if not isinstance(use_lm, bool):
        raise CorruptStream("reference .ecdc header: bad 'lm' flag")
    sr, ch, segmented = MODELS[name]
    frame_rate = math.ceil(sr / HOP)
    return StreamInfo(
        format_version=0, model_id=name, model_fingerprint=None, lm_id=f"encodec_lm_{name[8:]}" if use_lm else None,
        lm_fingerprint=None, sample_rate=sr, channels=ch, groups=1, source_sample_rate=sr, source_channels=ch,
        frame_rate=frame_rate, hop_length=HOP, n_q=nc, bandwidth=nc * frame_rate * 10 / 1000, bits_per_code=10,
        layout=OVERLAP if segmented else STREAM, segment_frames=150 if segmented else max(1, -(-al // HOP)),
        segment_length=sr if segmented else None, segment_stride=int(0.99 * sr) if segmented else None,
        scales=segmented, coder={"name": "encodec-arithmetic-v0"} if use_lm else None, length=al)


class Recorded:
    """A pipe whose bytes are kept as they are read, so that a reader can start again from its first byte."""

    def __init__(self, pipe: tp.BinaryIO) -> None:
        self.pipe, self.kept = pipe, bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.pipe.read(size)
        self.kept += data
        return data

    def again(self) -> tp.BinaryIO:
        """The pipe from its first byte: the kept bytes, then the rest."""
        return tp.cast(tp.BinaryIO, io.BufferedReader(_Replay(bytes(self.kept), self.pipe)))


class _Replay(io.RawIOBase):
    def __init__(self, head: bytes, rest: tp.BinaryIO) -> None:
        super().__init__()
        self.head, self.rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: tp.Any) -> int:
        if len(self.head):
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[:len(data)] = data
        return len(data)
