"""The .ecdc writer: audio chunks -> codes -> container segments, in bounded memory (`encode_stream`).

A causal codec's stream (`Codec.encode_stream`) is cut into segments of `segment_seconds`; a
segmented codec's into its overlapping 1 s segments (`model.segment_layout`), encoded a few at a
time. Segments are entropy-coded in batches (`entropy.LM_BATCH`) and each batch is written and
flushed as soon as it is coded. With the envelope correction (format version 2) the writer also
decodes each segment's codes and stores, with them, the corrections that bring the decoded audio's
spectral envelope to its input's (`neucodec.envelope`), which the decoder applies.
Byte layout: docs/FORMAT.md.
"""
from __future__ import annotations

import math
import struct
import typing as tp

import numpy as np
import torch

from . import container, engine, entropy, envelope, exactlm, streamspec
from .errors import NeucodecError, UnsupportedAudio, UnsupportedSetting, option
from .identity import model_identity
from .lm import LanguageModel
from .model import Codec, num_frames, segment_layout
from .streamspec import EncodeSettings, EnvelopeSpec, StreamInfo, encode_settings

Tensor = torch.Tensor
#: Frames of a segment with the envelope correction, at least: the streaming decoder that measures
#: the correction holds back up to a first step of under 8 frames (`_EnvelopeMeter.segment`).
MIN_CORRECTED_FRAMES = 8


def encode_stream(fo: tp.BinaryIO, codec: Codec, chunks: tp.Iterable[Tensor], **kw: tp.Any) -> StreamInfo:
    """Encode audio chunks into an .ecdc stream written to `fo` (which need not seek).

    Args:
        fo: binary output; flushed after each written batch of segments.
        codec: the codec (any device); its `model_id`/`fingerprint` go into the header.
        chunks: audio at `codec.sample_rate`, each [G, codec.channels, t] with a fixed G.
        bandwidth: kbps (picks the number of codebooks); None uses all.
        lm: entropy-coding LM (runs on the CPU, in exact arithmetic), or None for plain 10-bit packing.
        source_sample_rate, source_channels: of the original file, restored by the decoder.
        segment_seconds: causal codecs: length of a container segment (unit of damage and of
            random access; the LM restarts at each).
        progress: called with the number of samples of each chunk consumed.
        source_length: called once the chunks are exhausted: samples per channel of the original file,
            stored so that decoding restores its exact length after resampling. Not needed when the
            source rate is the codec's.
        correct_envelope: also store each segment's envelope correction (`streamspec.use_envelope`;
            format version 2): about 2.6 kbps more with table e4 (3.4 with e3), and the encoder runs
            the decoder too. None: if the codec's package opts in (`use_envelope`); a table name: with
            that table.
        settings: `bandwidth` and `correct_envelope` as `streamspec.encode_settings` checked them for
            this codec (then those two arguments are not used).
    Returns:
        the `StreamInfo` of the written stream (length, segments and bytes filled in).
    """
    return engine.complete(encode_calls(fo, codec, chunks, **kw))


def encode_calls(fo: tp.BinaryIO, codec: Codec, chunks: tp.Iterable[Tensor], *, bandwidth: float | None = None,
                 lm: LanguageModel | None, source_sample_rate: int, source_channels: int,
                 segment_seconds: float = 10.0, progress: tp.Callable[[int], None] | None = None,
                 source_length: tp.Callable[[], int] | None = None, correct_envelope: bool | str | None = False,
                 settings: EncodeSettings | None = None) -> tp.Generator[engine.Call, None, StreamInfo]:
    """`encode_stream`, yielding its model calls (`neucodec.engine`); returns the `StreamInfo`."""
    if getattr(codec, "decode_only", False):
        raise UnsupportedSetting(f"{codec.model_id} ({codec.fingerprint}) is an earlier model's decode side: it "
                                 "decodes its files but encodes none; encode with an installed model")
    if settings is None:
        settings = encode_settings(codec, bandwidth, correct_envelope)
    n_q, spec = settings.n_q, settings.envelope
    model_id, model_fp = model_identity(codec)
    lm_id, lm_fp = model_identity(lm) if lm is not None else (None, None)
    if lm is not None and lm.cfg.n_q < n_q:
        raise UnsupportedSetting(f"the LM models {lm.cfg.n_q} codebooks but {n_q} are coded; lower the bandwidth")
    it = iter(chunks)
    first = next(it, None)
    groups = int(first.shape[0]) if first is not None and first.dim() == 3 else 1
    cfg = codec.config
    causal = cfg.segment_length is None
    if causal and not cfg.seanet.causal:
        raise UnsupportedSetting(f"{cfg.name} is neither causal nor segmented; it cannot be encoded in a stream")
    seg_frames = _segment_frames(codec, segment_seconds, spec)
    if spec is not None and \
            spec.corrections(groups * codec.channels, seg_frames, codec.hop_length) > streamspec.MAX_CORRECTIONS:
        raise UnsupportedAudio(f"{groups * codec.channels} channels in segments of {segment_seconds:g} s are too "
                               f"many for the envelope correction; encode with {option('--no-envelope')}")
    coder = None if lm is None else {
        "name": "constriction.queue.RangeEncoder", "model": "Categorical(perfect=False)", "dtype": "float32",
        "prob_grid": entropy.PROB_GRID, "lm_threads": entropy.LM_THREADS, "word": "uint32le",
        "arithmetic": exactlm.NAME,
        "span_frames": entropy.lm_span(seg_frames, lm.cfg.past_context, codec.frame_rate)}
    info = StreamInfo(
        format_version=1 if spec is None else 2, model_id=model_id, model_fingerprint=model_fp, lm_id=lm_id,
        lm_fingerprint=lm_fp, sample_rate=codec.sample_rate, channels=codec.channels, groups=groups,
        source_sample_rate=int(source_sample_rate), source_channels=int(source_channels),
        frame_rate=codec.frame_rate, hop_length=codec.hop_length, n_q=n_q, bandwidth=settings.bandwidth,
        bits_per_code=int(math.log2(cfg.quantizer.bins)),
        layout=streamspec.STREAM if causal else streamspec.OVERLAP, segment_frames=seg_frames,
        segment_length=cfg.segment_length, segment_stride=cfg.segment_stride, scales=bool(cfg.normalize),
        coder=coder, envelope=spec)
    writer = container.ContainerWriter(fo, info.header(), info.format_version)
    sink = _SegmentSink(writer, info, None if lm is None else exactlm.exact(lm))
    audio = _Chunks(codec, first, it, progress)
    meter = None if spec is None else _EnvelopeMeter(codec, spec)
    if causal:
        buf: list[Tensor] = []
        have = 0
        for codes in codec.encode_calls(audio if meter is None else meter.watch(audio), n_q):
            if isinstance(codes, engine.Call):
                yield codes
                continue
            buf.append(codes)
            have += codes.shape[-1]
            while have >= seg_frames:
                allc = torch.cat(buf, -1)
                segment = allc[..., :seg_frames]
                correction = b"" if meter is None else (yield from meter.segment(segment, False))
                yield from sink.add(segment, None, correction)
                buf, have = [allc[..., seg_frames:]], have - seg_frames
        if have:
            segment = torch.cat(buf, -1)
            correction = b"" if meter is None else (yield from meter.segment(segment, True))
            yield from sink.add(segment, None, correction)
    else:
        yield from _encode_overlap(codec, audio, n_q, sink)
    yield from sink.flush()
    length = audio.samples
    if causal and info.frames != num_frames(length, codec.hop_length):
        raise NeucodecError(f"internal error: {info.frames} frames for {length} samples")
    info.length = length
    if source_length is not None:
        info.source_length = source_length()
    elif source_sample_rate == codec.sample_rate:
        info.source_length = length
    info.bytes = writer.close(length, info.source_length)
    return info


def _segment_frames(codec: Codec, segment_seconds: float, spec: EnvelopeSpec | None) -> int:
    """Frames of a full segment: one of a segmented codec's segments, or `segment_seconds` of a
    causal codec's stream (with the envelope correction: whole tiles, at least MIN_CORRECTED_FRAMES)."""
    segment_length = codec.config.segment_length
    if segment_length is not None:
        return num_frames(segment_length, codec.hop_length)
    frames = max(1, round(segment_seconds * codec.frame_rate))
    if spec is None:
        return frames
    per_tile = spec.frames_per_tile(codec.hop_length)
    return max(-(-frames // per_tile), -(-MIN_CORRECTED_FRAMES // per_tile)) * per_tile


class _Chunks:
    """The audio chunks of a stream, checked, moved to the codec's device and counted (`samples`)
    as they are consumed."""

    def __init__(self, codec: Codec, first: Tensor | None, rest: tp.Iterator[Tensor],
                 progress: tp.Callable[[int], None] | None) -> None:
        self.codec, self.first, self.rest, self.progress = codec, first, rest, progress
        self.samples = 0  # per channel, so far

    def __iter__(self) -> tp.Iterator[Tensor]:
        codec, first = self.codec, self.first
        chunk = first
        while chunk is not None:
            if chunk.dim() != 3 or chunk.shape[1] != codec.channels or \
                    (first is not None and chunk.shape[0] != first.shape[0]):
                raise UnsupportedAudio(f"audio chunks must be [groups, {codec.channels}, samples] with a fixed "
                                       f"number of groups, got {tuple(chunk.shape)}")
            if not torch.isfinite(chunk).all():  # NaN would spread through the LSTM into every later frame
                at = self.samples + int((~torch.isfinite(chunk)).flatten(0, 1).any(0).nonzero()[0])
                raise UnsupportedAudio(f"audio has NaN or infinite samples (first at {at / codec.sample_rate:.3f} s "
                                       "at the codec rate); repair the signal before encoding")
            self.samples += chunk.shape[-1]
            if self.progress is not None:
                self.progress(chunk.shape[-1])
            if chunk.shape[-1]:
                yield chunk.to(codec.device, torch.float32)
            chunk = next(self.rest, None)


class _SegmentSink:
    """Collects finished segments, codes them in batches and writes them."""

    def __init__(self, writer: container.ContainerWriter, info: StreamInfo, lm: exactlm.ExactLM | None) -> None:
        self.writer, self.info, self.lm = writer, info, lm
        self.pending: list[tuple[Tensor, Tensor | None, bytes]] = []
        self.batch = entropy.LM_BATCH if lm is not None else 1

    def add(self, codes: Tensor, scales: Tensor | None, correction: bytes = b"") -> tp.Iterator[engine.Call]:
        """One segment's codes [G, K, F], volume scales [G] and coded envelope correction."""
        self.pending.append((codes.detach().cpu(), None if scales is None else scales.detach().cpu().float(),
                             correction))
        if len(self.pending) >= self.batch:
            yield from self.flush()

    def flush(self) -> tp.Iterator[engine.Call]:
        if not self.pending:
            return
        call = engine.encode_segments([c for c, _, _ in self.pending], self.lm, self.info.bits_per_code,
                                      self.info.lm_span)
        yield call
        coded: list[entropy.CodedSegment] = call.result()
        for (codes, scales, correction), seg in zip(self.pending, coded):
            prefix = b"" if scales is None else np.ascontiguousarray(scales.numpy(), dtype="<f4").tobytes()
            self.writer.write_segment(prefix + correction + seg.payload, codes.shape[-1], codes.shape[0], seg.flags,
                                      seg.codes_crc)
            self.info.segments += 1
            self.info.frames += codes.shape[-1]
            self.info.lm_segments += seg.flags in container.LM_FLAGS
            self.info.envelope_bytes += len(correction)
        self.pending = []


def _encode_overlap(codec: Codec, audio: _Chunks, n_q: int, sink: _SegmentSink) -> tp.Iterator[engine.Call]:
    """Segmented codec: cut the stream into its overlapping segments and encode them a few at a time:
    full segments as soon as their samples are in, the shorter last ones each alone at the end."""
    seg_len = tp.cast(int, codec.config.segment_length)
    stride = tp.cast(int, codec.config.segment_stride)
    buf = torch.zeros(0)
    buf_start = 0  # absolute sample index of buf[..., 0]
    next_offset = 0
    written = 0
    ready: list[Tensor] = []

    def run(batch: list[Tensor]) -> tp.Iterator[engine.Call]:
        G = batch[0].shape[0]
        call = codec.encode_segments_call(torch.cat(batch, 0), n_q)
        yield call
        codes, scales = call.result()
        for i in range(len(batch)):
            yield from sink.add(codes[i * G:(i + 1) * G], None if scales is None else scales[i * G:(i + 1) * G])

    for chunk in audio:
        buf = chunk if buf.numel() == 0 else torch.cat([buf, chunk], -1)
        while buf_start + buf.shape[-1] >= next_offset + seg_len:
            ready.append(buf[..., next_offset - buf_start: next_offset - buf_start + seg_len])
            next_offset += stride
            written += 1
            if len(ready) >= entropy.LM_BATCH:
                yield from run(ready)
                ready = []
        drop = next_offset - buf_start
        if drop > 0:
            buf = buf[..., drop:].clone()
            buf_start = next_offset
    if ready:
        yield from run(ready)
    length = audio.samples
    for seg in segment_layout(length, codec.hop_length, seg_len, stride)[written:] if length else []:
        yield from run([buf[..., seg.offset - buf_start: seg.offset - buf_start + seg.length]])


class _EnvelopeMeter:
    """Encoder side of the envelope correction: keeps the input audio, decodes each segment's codes
    (a decoder of its own, streaming) and codes the correction of the decoded audio."""

    def __init__(self, codec: Codec, spec: EnvelopeSpec) -> None:
        self.codec = codec
        self.grid, self.table = spec.grid, spec.probabilities
        self.inputs: list[Tensor] = []
        self.state: tp.Any = None

    def watch(self, chunks: tp.Iterable[Tensor]) -> tp.Iterator[Tensor]:
        """Pass the audio through, keeping it until its segment is measured."""
        for chunk in chunks:
            self.inputs.append(chunk.detach().cpu())
            yield chunk

    def segment(self, codes: Tensor, final: bool) -> tp.Generator[engine.Call, None, bytes]:
        """The coded correction of the next segment's codes [G, K, F] (its input must have been seen).
        The decoder holds back nothing but a first step of under 8 frames, unless `final`: segments
        are longer (`MIN_CORRECTED_FRAMES`)."""
        call = self.codec.decode_step_call(codes, self.state, final)
        yield call
        decoded, self.state = call.result()
        x = torch.cat(self.inputs, -1) if self.inputs else torch.zeros(codes.shape[0], self.codec.channels, 0)
        n = min(x.shape[-1], codes.shape[-1] * self.codec.hop_length)  # the last segment: what is left
        self.inputs = [x[..., n:]]
        rows = x.shape[0] * x.shape[1]
        ref = x[..., :n].reshape(rows, n).double().numpy()
        out = decoded[..., :n].reshape(rows, n).double().cpu().numpy()
        steps = np.stack([envelope.measure(r, o, self.grid) for r, o in zip(ref, out)])
        payload = envelope.encode_steps(steps, self.table)
        if not np.array_equal(envelope.decode_steps(payload, self.table, *steps.shape), steps):
            raise NeucodecError("internal error: the envelope correction does not decode; encode with "
                                f"{option('--no-envelope')}")
        return struct.pack("<I", len(payload)) + payload
