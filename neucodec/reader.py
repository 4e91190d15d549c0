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

from . import container, container_salvage, engine, entropy, envelope, streamspec
from . import salvage as salvaging
from .errors import CorruptStream, DamagedStream, NeucodecError
from .identity import resolve_codec, resolve_lm
from .lm import LanguageModel
from .model import Codec
from .probe import _check_end, _correction_size, read_header, read_info  # noqa: F401 - re-exported; they need no torch
from .streamaudio import SegmentCodes, audio, guard
from .streamspec import StreamInfo
from .v0reader import decode_v0

Tensor = torch.Tensor


def decode_stream(fi: tp.BinaryIO, codec: Codec | None = None, lm: LanguageModel | None = None,
                  **kw: tp.Any) -> tuple[StreamInfo, tp.Iterator[Tensor]]:
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
        salvage: decode through damage (`neucodec.salvage`): a lost segment's span becomes silence
            of its length, every intact segment is decoded as it would be in an undamaged stream,
            and the length comes from the segments read when the end record is lost. Without it the
            first damage raises `DamagedStream`, naming its span in seconds. Version-0 streams have
            no checksums to salvage by and decode as without it.
        on_lost: with `salvage`, called with one line (seconds, segment, byte, cause) per lost run.
    Returns:
        (info, chunks): audio chunks [G, C, t] at the codec rate, `info.length` samples in all;
        `info.length` and the totals are filled in once the iterator is exhausted.
    Raises:
        CorruptStream (DamagedStream for damage that salvage decodes around), UnsupportedFormatVersion,
        ModelMismatch: with a one-line message.
    """
    info, chunks = decode_calls(fi, codec, lm, **kw)
    return info, engine.alone(chunks)


def decode_calls(fi: tp.BinaryIO, codec: Codec | None = None, lm: LanguageModel | None = None, *,
                 v0_lm_threads: int | None = None, salvage: bool = False,
                 on_lost: tp.Callable[[str], None] | None = None,
                 ) -> tuple[StreamInfo, tp.Iterator[Tensor | engine.Call]]:
    """`decode_stream`, its model calls (`neucodec.engine`) among its chunks."""
    prelude = container.read_prelude(fi, repair_damage=salvage)
    if prelude.version == 0:
        return decode_v0(fi, prelude, codec, lm, v0_lm_threads)
    info = StreamInfo.from_header(prelude.header, prelude.version)
    info.header_bytes = prelude.size  # as `read_info` counts them
    codec = resolve_codec(codec, info)
    reader = container.ContainerReader(fi, prelude)
    plan = salvaging.Salvage(container_salvage.SalvageReader(fi, prelude), info, on_lost) if salvage else None
    segments = _Segments(reader, info, None if lm is None or info.lm_id is None else resolve_lm(lm, info),
                         plan, codec)
    codes = iter(segments)

    def finish() -> int:
        for _ in codes:  # pragma: no cover - all consumed already
            pass
        if plan is not None:
            return plan.finish()
        try:
            return _check_end(reader, info)
        except DamagedStream as e:
            raise salvaging.located(e, info) from None

    return info, guard(audio(codes, codec, info, finish, salvage=salvage))


class _Segments:
    """The segments of a stream, read, checked and decoded (LM-coded ones in batches); the totals
    (`segments`, `frames`, `lm_segments`, `envelope_bytes`) are counted into `info` as they are read.
    With `salvage`, lost segments and those whose payload cannot be decoded come as stand-ins
    (`SegmentCodes.lost`) of their length: codes of silence (a causal codec's decoder runs through
    them), corrections of 0 dB."""

    def __init__(self, reader: container.ContainerReader, info: StreamInfo, lm: LanguageModel | None,
                 salvage: salvaging.Salvage | None = None, codec: Codec | None = None) -> None:
        self.reader, self.info = reader, info
        self.lm = lm  # loaded when the first LM-coded segment needs it, if not given
        self.salvage, self.codec = salvage, codec
        self._silence: Tensor | None = None

    def __iter__(self) -> tp.Iterator[SegmentCodes | engine.Call]:
        try:
            yield from self._segments()
        except DamagedStream as e:
            raise salvaging.located(e, self.info) from None

    def _segments(self) -> tp.Iterator[SegmentCodes | engine.Call]:
        info = self.info
        batch: list[container.SegmentRecord] = []
        for record in self.reader if self.salvage is None else self.salvage:
            if isinstance(record, salvaging.LostPiece):
                if batch:
                    yield from (yield from self._decode(batch))
                    batch = []
                yield self._stand_in(record.frames)
                continue
            if self.salvage is None:
                problem = salvaging.shape_problem(record, info)
                if problem is not None:
                    raise DamagedStream(f"segment {record.index} at byte {record.offset}: {problem} (file damaged)",
                                        record.index, record.offset, problem)
                info.segments += 1
                info.frames += record.frames
                info.lm_segments += record.flags in container.LM_FLAGS
                info.payload_bytes += len(record.payload)
            batch.append(record)
            if len(batch) >= entropy.LM_BATCH or record.flags not in container.LM_FLAGS:
                yield from (yield from self._decode(batch))
                batch = []
        if batch:
            yield from (yield from self._decode(batch))

    def _stand_in(self, frames: int) -> SegmentCodes:
        """What decodes in place of a lost segment of `frames` frames."""
        info = self.info
        G, K = info.groups, info.n_q
        if self._silence is None:
            self._silence = _silence_codes(self.codec, K) if info.layout == streamspec.STREAM and \
                self.codec is not None else torch.zeros(K, dtype=torch.long)
        steps = None
        if info.envelope is not None:
            tiles = info.envelope.grid.tiles(frames * info.hop_length)
            steps = np.zeros((G * info.channels, info.envelope.grid.bands, tiles), np.int8)
        return SegmentCodes(self._silence[None, :, None].expand(G, K, frames).clone(), None, steps, lost=True)

    def _decode(self, records: list[container.SegmentRecord]) -> tp.Generator[engine.Call, None, list[SegmentCodes]]:
        """The codes of intact records; with salvage, a stand-in for each one that fails."""
        if self.salvage is None:
            return (yield from self._decode_checked(records))
        try:
            return (yield from self._decode_checked(records))
        except (NeucodecError, ValueError, RuntimeError, IndexError, OverflowError, struct.error) as e:
            if len(records) > 1:  # which of them: one at a time
                out = []
                for r in records:
                    out += yield from self._decode([r])
                return out
            reason = e.reason if isinstance(e, DamagedStream) else "undecodable payload"
            piece = self.salvage.lost_record(records[0], reason)
            return [self._stand_in(piece.frames)]

    def _decode_checked(self, records: list[container.SegmentRecord]
                        ) -> tp.Generator[engine.Call, None, list[SegmentCodes]]:
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
                    raise DamagedStream(f"{where}: invalid volume scale (file damaged)", r.index, r.offset,
                                        "invalid volume scale")
                payload = payload[4 * G:]
            if info.envelope is not None:
                steps, payload = _split_corrections(payload, info, r.frames, where)
            todo.append((r.flags, payload, (G, K, r.frames), where))
            scales.append(sc)
            corrections.append(steps)
        if self.lm is None and any(t[0] in container.LM_FLAGS for t in todo):
            self.lm = resolve_lm(None, info)
        call = engine.decode_segments(todo, self.lm, info.bits_per_code, info.lm_span)
        yield call
        codes = call.result()
        out = []
        for r, c, sc, steps in zip(records, codes, scales, corrections):
            if entropy.codes_crc32(c) != r.codes_crc:
                raise DamagedStream(f"segment {r.index} at byte {r.offset}: decoded codes fail their CRC "
                                    "(LM probabilities differ from the encoder's machine, or file damaged)",
                                    r.index, r.offset, "decoded codes fail their CRC")
            out.append(SegmentCodes(c, sc, steps))
        return out


def _silence_codes(codec: Codec, n_q: int) -> Tensor:
    """The codes [n_q] a causal codec's encoder settles on for digital silence: a lost span decoded
    with them leaves the decoder's state nearer a real one than code 0 does, so the audio after it
    meets an undamaged decode's sooner (docs/FORMAT.md §8)."""
    try:
        zeros = torch.zeros(1, codec.channels, codec.sample_rate // 4, device=codec.device)
        codes = torch.cat(list(codec.encode_stream([zeros], n_q)), -1)
        return codes[0, :, -1].cpu().long()
    except (RuntimeError, ValueError, NeucodecError):  # pragma: no cover - any valid codes will do
        return torch.zeros(n_q, dtype=torch.long)


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
