"""The .ecdc reader: container records -> checked segment codes -> audio chunks (`decode_stream`), and `read_info`.

Segments are read and checked one by one (shape against the header, payload size, CRCs), LM-coded
ones decoded in batches of `entropy.LM_BATCH`, and each segment's decoded codes checked against
the CRC32 the writer stored; their audio comes from `neucodec.streamaudio`. Version-0 files of
the reference encodec tool go to `neucodec.v0reader`. Byte layout: docs/FORMAT.md.
"""
from __future__ import annotations

import struct
import typing as tp

import numpy as np
import torch

from . import container, entropy, envelope, streamspec
from .audio_io import expected_length
from .errors import CorruptStream
from .identity import resolve_codec, resolve_lm
from .lm import LanguageModel
from .model import Codec
from .streamaudio import SegmentCodes, audio, guard
from .streamspec import StreamInfo
from .v0reader import decode_v0, v0_info

if tp.TYPE_CHECKING:
    from .lockstep import SharedCoder

Tensor = torch.Tensor


def decode_stream(fi: tp.BinaryIO, codec: Codec | None = None, lm: LanguageModel | None = None, *,
                  v0_lm_threads: int | None = None,
                  segments_coder: SharedCoder | None = None) -> tuple[StreamInfo, tp.Iterator[Tensor]]:
    """Read an .ecdc stream (v1, v2, or a reference v0 file) and decode it chunk by chunk.

    Args:
        fi: binary input (a pipe is fine).
        codec: the codec to use; None loads the one the header names (`hub.load_codec`).
        lm: the entropy-coding LM; None loads the one the header names when a segment needs it
            (for a reference file coded with the LM: the official `encodec_lm_24khz`/`_48khz`).
        v0_lm_threads: reference files coded with the LM only: the torch thread count the writer's
            LM ran with (their probabilities depend on it; see `neucodec.v0lm`). None: the
            environment variable `NEUCODEC_V0_LM_THREADS`, else this process's torch thread count
            (what the reference tool itself would use here).
        segments_coder: what decodes the segments' codes: None for `neucodec.entropy`, or a lockstep
            run's shared view of it (`lockstep.SharedCoder`).
    Returns:
        (info, chunks): audio chunks [G, C, t] at the codec rate, `info.length` samples in all;
        `info.length` and the totals are filled in once the iterator is exhausted.
    Raises:
        CorruptStream, UnsupportedFormatVersion, ModelMismatch: with a one-line message.
    """
    prelude = container.read_prelude(fi)
    if prelude.version == 0:
        return decode_v0(fi, prelude, codec, lm, v0_lm_threads)
    info = StreamInfo.from_header(prelude.header, prelude.version)
    codec = resolve_codec(codec, info)
    reader = container.ContainerReader(fi, prelude)
    decode_segments = entropy.decode_segments if segments_coder is None else segments_coder.decode_segments
    segments = _Segments(reader, info, None if lm is None or info.lm_id is None else resolve_lm(lm, info),
                         decode_segments)
    codes = iter(segments)

    def finish() -> int:
        for _ in codes:  # pragma: no cover - all consumed already
            pass
        return _check_end(reader, info)

    return info, guard(audio(codes, codec, info, finish))


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
    reader = container.ContainerReader(fi, prelude)
    for record in reader:
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


class _Segments:
    """The segments of a stream, read, checked and decoded (LM-coded ones in batches); the totals
    (`segments`, `frames`, `lm_segments`, `envelope_bytes`) are counted into `info` as they are read."""

    def __init__(self, reader: container.ContainerReader, info: StreamInfo, lm: LanguageModel | None,
                 decode_segments: tp.Callable[..., list[Tensor]]) -> None:
        self.reader, self.info, self.decode_segments = reader, info, decode_segments
        self.lm = lm  # loaded when the first LM-coded segment needs it, if not given

    def __iter__(self) -> tp.Iterator[SegmentCodes]:
        info = self.info
        G = info.groups
        batch: list[container.SegmentRecord] = []
        for record in self.reader:
            where = f"segment {record.index} at byte {record.offset}"
            if record.items != G:
                raise CorruptStream(f"{where}: {record.items} channel groups, header says {G} (file damaged)")
            if not 1 <= record.frames <= info.segment_frames:
                raise CorruptStream(f"{where}: {record.frames} frames, segments hold at most {info.segment_frames}")
            if len(record.payload) > _payload_bound(info, G, record.frames) or \
                    (info.scales and len(record.payload) < 4 * G):
                raise CorruptStream(f"{where}: payload of {len(record.payload)} bytes is impossible for "
                                    f"{record.frames} frames (file damaged)")
            info.segments += 1
            info.frames += record.frames
            info.lm_segments += record.flags in container.LM_FLAGS
            batch.append(record)
            if len(batch) >= entropy.LM_BATCH or record.flags not in container.LM_FLAGS:
                yield from self._decode(batch)
                batch = []
        if batch:
            yield from self._decode(batch)

    def _decode(self, records: list[container.SegmentRecord]) -> list[SegmentCodes]:
        info = self.info
        G, K = info.groups, info.n_q
        todo, scales, corrections = [], [], []
        for r in records:
            where = f"segment {r.index} at byte {r.offset}"
            payload = r.payload
            sc = steps = None
            if info.scales:
                sc = torch.from_numpy(np.frombuffer(payload[: 4 * G], dtype="<f4").astype(np.float32))
                if not torch.isfinite(sc).all():
                    raise CorruptStream(f"{where}: invalid volume scale (file damaged)")
                payload = payload[4 * G:]
            if info.envelope is not None:
                steps, payload = _split_corrections(payload, info, r.frames, where)
            todo.append((r.flags, payload, (G, K, r.frames), where))
            scales.append(sc)
            corrections.append(steps)
        if self.lm is None and any(t[0] in container.LM_FLAGS for t in todo):
            self.lm = resolve_lm(None, info)
        codes = self.decode_segments(todo, self.lm, info.bits_per_code, span=info.lm_span)
        out = []
        for r, c, sc, steps in zip(records, codes, scales, corrections):
            if entropy.codes_crc32(c) != r.codes_crc:
                raise CorruptStream(f"segment {r.index} at byte {r.offset}: decoded codes fail their CRC "
                                    "(LM probabilities differ from the encoder's machine, or file damaged)")
            out.append(SegmentCodes(c, sc, steps))
        return out


def _payload_bound(info: StreamInfo, items: int, frames: int) -> int:
    corrections = 0 if info.envelope is None else 4 * items * info.channels * 1024 * frames  # far above any real one
    return 4 * items * info.scales + items * info.n_q * frames * 4 + corrections + 64


def _correction_size(payload: bytes, where: str) -> int:
    """Bytes of the envelope corrections at the start of `payload` (a segment's, after its scales)."""
    (size,) = struct.unpack("<I", payload[:4]) if len(payload) >= 4 else (-1,)
    if size < 0 or size % 4 or 4 + size > len(payload):
        raise CorruptStream(f"{where}: envelope correction of a bad length (file damaged)")
    return size


def _split_corrections(payload: bytes, info: StreamInfo, frames: int, where: str) -> tuple[np.ndarray, bytes]:
    """Split a segment payload (after its scales) into its envelope corrections [G * C, bands, tiles]
    and the codes' payload; counts the corrections' bytes into `info.envelope_bytes`."""
    spec = tp.cast(streamspec.EnvelopeSpec, info.envelope)
    rows, tiles = info.groups * info.channels, spec.grid.tiles(frames * info.hop_length)
    if rows * spec.grid.bands * tiles > streamspec.MAX_CORRECTIONS:
        raise CorruptStream(f"{where}: {rows * spec.grid.bands * tiles} envelope corrections exceed the limit of "
                            f"{streamspec.MAX_CORRECTIONS} per segment (file damaged)")
    size = _correction_size(payload, where)
    info.envelope_bytes += 4 + size
    return envelope.decode_steps(payload[4: 4 + size], spec.probabilities, rows, spec.grid.bands, tiles), \
        payload[4 + size:]


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
