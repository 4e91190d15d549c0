"""A stream's audio from its segments' codes: streaming decode or overlap-add, envelope correction, exact length.

Both readers (`neucodec.reader`, `neucodec.v0reader`) hand the codes of consecutive segments to
`audio`, which yields audio chunks [G, C, t] as soon as they are final: a causal codec decodes the
segments as one stream (`Codec.decode_calls`), a segmented codec's segments are decoded one at a
time and overlap-added (`model.OverlapAdd`). The last chunk is cut to the stream's length. Model
calls (`neucodec.engine.Call`) pass through every stage, up, beside the audio.
"""
from __future__ import annotations

import struct
import typing as tp

import numpy as np
import torch

from . import envelope, streamspec
from .engine import Call
from .errors import CorruptStream, NeucodecError
from .model import Codec, OverlapAdd

if tp.TYPE_CHECKING:
    from .streamspec import StreamInfo

Tensor = torch.Tensor


#: Seconds over which salvaged audio fades out into a lost span and in after it.
FADE_SECONDS = 0.01


class SegmentCodes(tp.NamedTuple):
    """One segment as a reader decoded it."""

    codes: Tensor  # [G, K, F]
    scales: Tensor | None  # [G] volume scales of a normalising codec
    corrections: np.ndarray | None  # envelope corrections [G * C, bands, tiles]
    lost: bool = False  # a lost segment's stand-in (salvage): its span is silenced


def audio(segments: tp.Iterator[SegmentCodes | Call], codec: Codec, info: StreamInfo,
          finish: tp.Callable[[], int], salvage: bool = False) -> tp.Iterator[Tensor | Call]:
    """Codes of consecutive segments -> audio chunks [G, C, t], the envelope corrections applied
    when the segments have them. `finish` is called once the segments are consumed (or there are
    none): it checks the end of the stream and returns its length, to which the audio is cut (and,
    with `salvage`, where lost segments left it short, padded with silence).

    A lost segment's stand-in (`lost`) is silence: a segmented codec's is not decoded (the
    overlap-add fades its neighbours out into it); a causal codec decodes its codes, which keeps
    the decoder's timing and state going, and its span is then muted, the audio fading out into it
    and in after it over FADE_SECONDS (`_mute`)."""
    trim = _Trim(finish)
    if info.layout == streamspec.OVERLAP:
        yield from _overlap_audio(segments, codec, info, trim)
    else:
        spans: list[tuple[int, int]] = []
        tracked = _track(segments, info.hop_length, spans)
        chunks = _stream_audio((s if isinstance(s, Call) else s.codes for s in tracked), codec, trim) \
            if info.envelope is None else _corrected_audio(tracked, codec, info, trim)
        yield from _mute(chunks, spans, round(FADE_SECONDS * info.sample_rate))
    if salvage and trim.length is not None and trim.emitted < trim.length:
        yield torch.zeros(info.groups, info.channels, trim.length - trim.emitted)


def _track(segments: tp.Iterable[SegmentCodes | Call], hop: int,
           spans: list[tuple[int, int]]) -> tp.Iterator[SegmentCodes | Call]:
    """`segments`, noting the samples [start, end) of the lost ones in `spans` as they pass."""
    at = 0
    for s in segments:
        if isinstance(s, Call):
            yield s
            continue
        n = s.codes.shape[-1] * hop
        if s.lost:
            if spans and spans[-1][1] == at:
                spans[-1] = (spans[-1][0], at + n)
            else:
                spans.append((at, at + n))
        at += n
        yield s


def _mute(chunks: tp.Iterator[Tensor | Call], spans: list[tuple[int, int]], fade: int) -> tp.Iterator[Tensor | Call]:
    """Audio chunks with the lost `spans` silenced: fading out over their first `fade` samples and
    in over the `fade` samples after them. A span is known before its audio comes (its codes are
    read first)."""
    at = 0
    for chunk in chunks:
        if isinstance(chunk, Call):
            yield chunk
            continue
        t = chunk.shape[-1]
        gain = None
        for a, b in spans:
            if b + fade <= at or a >= at + t:
                continue
            pos = torch.arange(at, at + t, dtype=torch.float64)
            g = torch.ones(t, dtype=torch.float64)
            inside = (pos >= a) & (pos < b)
            g[inside] = (1 - (pos[inside] - a + 1) / (fade + 1)).clamp(min=0)
            after = (pos >= b) & (pos < b + fade)
            g[after] = (pos[after] - b + 1) / (fade + 1)
            gain = g if gain is None else torch.minimum(gain, g)
        if gain is not None:
            chunk = chunk * gain.to(chunk.dtype)
        at += t
        yield chunk


class _Trim:
    """Cuts the last chunk of a stream's audio to the stream's length (`finish()`)."""

    def __init__(self, finish: tp.Callable[[], int]) -> None:
        self._finish = finish
        self.emitted = 0  # samples per channel yielded so far
        self.length: int | None = None  # the stream's, once `finish` has said it

    def finish(self) -> int:
        self.length = self._finish()
        return self.length

    def __call__(self, chunk: Tensor, final: bool) -> Tensor:
        if final:
            chunk = chunk[..., : max(0, self.finish() - self.emitted)]
        self.emitted += chunk.shape[-1]
        return chunk


def _stream_audio(codes: tp.Iterator[Tensor | Call], codec: Codec, trim: _Trim) -> tp.Iterator[Tensor | Call]:
    """A causal codec's audio of consecutive code pieces, trimmed (the last one once the stream ends)."""
    held: Tensor | None = None
    for item in codec.decode_calls(c if isinstance(c, Call) else c.to(codec.device) for c in codes):
        if isinstance(item, Call):
            yield item
            continue
        if held is not None:
            out = trim(held, False)
            if out.shape[-1]:
                yield out
        held = item.float().cpu()
    if held is None:
        trim.finish()
        return
    out = trim(held, True)
    if out.shape[-1]:  # a salvaged stream's length may end before the last step
        yield out


def _corrected_audio(segments: tp.Iterator[SegmentCodes | Call], codec: Codec, info: StreamInfo,
                     trim: _Trim) -> tp.Iterator[Tensor | Call]:
    """`_stream_audio` with each segment's envelope corrections applied (`envelope.Corrector`)."""
    spec = tp.cast(streamspec.EnvelopeSpec, info.envelope)
    corrector = envelope.Corrector(spec.grid, info.groups * info.channels)

    def pieces() -> tp.Iterator[Tensor | Call]:
        for s in segments:
            if isinstance(s, Call):
                yield s
                continue
            corrector.add(tp.cast(np.ndarray, s.corrections))  # before the audio they correct
            yield s.codes

    shape = (info.groups, info.channels, -1)
    for chunk in _stream_audio(pieces(), codec, trim):
        if isinstance(chunk, Call):
            yield chunk
            continue
        out = corrector.push(chunk.reshape(-1, chunk.shape[-1]).double().numpy())
        if out.shape[-1]:
            yield torch.from_numpy(out.astype(np.float32)).reshape(shape)
    out = corrector.finish()
    if out.shape[-1]:
        yield torch.from_numpy(out.astype(np.float32)).reshape(shape)


def _overlap_audio(segments: tp.Iterator[SegmentCodes | Call], codec: Codec, info: StreamInfo,
                   trim: _Trim) -> tp.Iterator[Tensor | Call]:
    """A segmented codec's segments, decoded one at a time and overlap-added."""
    ola = OverlapAdd(tp.cast(int, info.segment_stride))

    def frame(s: SegmentCodes) -> tp.Generator[Call, None, Tensor]:
        if s.lost:
            return torch.zeros(info.groups, info.channels, s.codes.shape[-1] * info.hop_length)
        scales = None if s.scales is None else s.scales.to(codec.device)
        call = codec.decode_segments_call(s.codes.to(codec.device), scales)
        yield call
        return call.result().float().cpu()

    held: SegmentCodes | None = None
    for s in segments:
        if isinstance(s, Call):
            yield s
            continue
        if held is not None:
            yield trim(ola.add((yield from frame(held))), False)
        held = s
    if held is None:
        trim.finish()
        return
    yield trim(ola.add((yield from frame(held)), last=True), True)


def guard(it: tp.Iterator[Tensor | Call]) -> tp.Iterator[Tensor | Call]:
    """Turn low-level failures on hostile input into CorruptStream (never a bare traceback)."""
    try:
        yield from it
    except NeucodecError:
        raise
    except (ValueError, RuntimeError, IndexError, OverflowError, struct.error) as e:
        raise CorruptStream(f"undecodable stream ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
