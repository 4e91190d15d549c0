"""Streaming .ecdc writer and reader: audio chunks -> codes -> container, and back, in bounded memory.

`encode_stream` writes one container segment per `segment_seconds` of frames for a causal codec
(via `Codec.encode_stream`), or one per model segment (1 s with overlap) for a segmented codec,
and flushes each batch of segments as soon as it is coded. With `correct_envelope` (causal codecs)
it also decodes each segment's codes and stores, with them, the corrections that bring the decoded
audio's spectral envelope to its input's (`neucodec.envelope`; format version 2), which the decoder
applies. `decode_stream` yields audio chunks after the first batch of segments. Version-0 files of the reference encodec tool are read too
(those coded with its LM through `neucodec.v0lm`). Byte layout: docs/FORMAT.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import struct
import typing as tp

import numpy as np
import torch

from . import __version__, container, entropy, envelope, exactlm, v0lm
from .audio_io import expected_length
from .errors import CorruptStream, ModelMismatch, NeucodecError, UnsupportedAudio, UnsupportedFormatVersion
from .lm import LanguageModel
from .model import Codec, overlap_add

Tensor = torch.Tensor

LM_BATCH = 8  # segments coded/decoded together in one batched LM run
MAX_CORRECTIONS = 1 << 20  # envelope corrections per segment (10 s of stereo with table e3: 40,000; e4: 30,000)
_V0_CHUNK_FRAMES = 800  # 800 * K * 10 bits is always whole bytes


# ---------------------------------------------------------------- identity
def model_identity(model: torch.nn.Module) -> tuple[str, str]:
    """(model_id, fingerprint) of a codec or LM: attributes set by `neucodec.hub`, else derived.

    A model built in code (tests, training) gets the id of its config and a fingerprint from the
    SHA-256 of its state_dict, computed once and cached on the module.
    """
    mid = getattr(model, "model_id", None)
    fp = getattr(model, "fingerprint", None)
    if mid is not None and fp is not None:
        return str(mid), str(fp)
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    mid = mid or getattr(cfg, "name", None) or type(model).__name__.lower()
    fp = "sd:" + h.hexdigest()[:16]
    model.model_id = mid  # type: ignore[assignment]
    model.fingerprint = fp  # type: ignore[assignment]
    return str(mid), fp


# ---------------------------------------------------------------- info
@dataclasses.dataclass
class StreamInfo:
    """Everything the header says, plus totals found while reading (`length`, `segments`, `bytes`)."""

    format_version: int
    model_id: str
    model_fingerprint: str | None
    lm_id: str | None
    lm_fingerprint: str | None
    sample_rate: int
    channels: int  # channels of the model
    groups: int  # coded channel groups G (a mono model coding stereo: 2)
    source_sample_rate: int
    source_channels: int
    frame_rate: int
    hop_length: int
    n_q: int
    bandwidth: float | None
    bits_per_code: int
    layout: str  # "stream" (causal, consecutive segments) or "overlap" (1 s segments, overlap-add)
    segment_frames: int  # frames per full segment
    segment_length: int | None  # samples per full segment ("overlap")
    segment_stride: int | None  # samples between segment starts ("overlap")
    scales: bool  # per-segment volume scales stored
    coder: dict[str, tp.Any] | None  # LM coder settings, None without LM
    envelope: dict[str, tp.Any] | None = None  # envelope correction settings (format version 2), or None
    length: int | None = None  # samples per channel at the codec rate (known after the end marker)
    source_length: int | None = None  # of the original file at its rate, when the stream records it
    segments: int = 0
    lm_segments: int = 0
    frames: int = 0
    bytes: int = 0
    envelope_bytes: int = 0  # of the envelope corrections, with their length words

    @property
    def duration(self) -> float | None:
        return None if self.length is None else self.length / self.sample_rate

    def to_dict(self) -> dict[str, tp.Any]:
        d = dataclasses.asdict(self)
        d["duration"] = self.duration
        d["kbps"] = (8 * self.bytes / 1000 / self.duration) if self.duration else None
        d["envelope_kbps"] = (8 * self.envelope_bytes / 1000 / self.duration) if self.duration else None
        return d


def _header(info: StreamInfo) -> dict[str, tp.Any]:
    d = dataclasses.asdict(info)
    for key in ("format_version", "length", "source_length", "segments", "lm_segments", "frames", "bytes",
                "envelope_bytes"):
        d.pop(key)
    if d["envelope"] is None:  # a version-1 header, as before
        d.pop("envelope")
    d["encoder"] = f"neucodec {__version__}"
    return d


_INT_FIELDS = {  # name: (min, max)
    "sample_rate": (1, 1 << 20), "channels": (1, 64), "groups": (1, 1024), "source_sample_rate": (1, 1 << 20),
    "source_channels": (1, 1024), "frame_rate": (1, 1 << 20), "hop_length": (1, 1 << 20), "n_q": (1, 1024),
    "bits_per_code": (1, 16), "segment_frames": (1, 1 << 22),
}


def _info_from_header(h: dict[str, tp.Any], version: int) -> StreamInfo:
    def need(key: str, types: tuple[type, ...], optional: bool = False) -> tp.Any:
        if key not in h:
            raise CorruptStream(f"header: field {key!r} missing (file damaged or not written by neucodec)")
        value = h[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise CorruptStream(f"header: field {key!r} has a bad value {str(value)[:40]!r}")
        return value

    values: dict[str, tp.Any] = {}
    for key, (lo, hi) in _INT_FIELDS.items():
        v = need(key, (int,))
        if not lo <= v <= hi:
            raise CorruptStream(f"header: field {key!r} = {v} out of range [{lo}, {hi}]")
        values[key] = v
    layout = need("layout", (str,))
    if layout not in ("stream", "overlap"):
        raise UnsupportedFormatVersion(f"header: unknown segment layout {layout!r}; upgrade neucodec")
    seg_len = need("segment_length", (int,), optional=True)
    seg_stride = need("segment_stride", (int,), optional=True)
    if layout == "overlap" and not (isinstance(seg_len, int) and isinstance(seg_stride, int)
                                    and 1 <= seg_stride <= seg_len <= 1 << 24):
        raise CorruptStream("header: overlap layout without a valid segment length and stride")
    coder = need("coder", (dict,), optional=True)
    bw = need("bandwidth", (int, float), optional=True)
    env = need("envelope", (dict,)) if version >= 2 else None
    if env is not None:
        _envelope_grid(env, layout, values["hop_length"], values["segment_frames"])
    return StreamInfo(
        format_version=version, envelope=env, model_id=need("model_id", (str,)),
        model_fingerprint=need("model_fingerprint", (str,), optional=True),
        lm_id=need("lm_id", (str,), optional=True), lm_fingerprint=need("lm_fingerprint", (str,), optional=True),
        layout=layout, segment_length=seg_len, segment_stride=seg_stride, scales=need("scales", (bool,)),
        coder=coder, bandwidth=None if bw is None else float(bw), **values)


# ---------------------------------------------------------------- encoding
def _counted(chunks: tp.Iterable[Tensor], codec: Codec, first: Tensor | None, rest: tp.Iterator[Tensor],
             progress: tp.Callable[[int], None] | None, total: list[int]) -> tp.Iterator[Tensor]:
    chunk = first
    while chunk is not None:
        if chunk.dim() != 3 or chunk.shape[1] != codec.channels or (first is not None and chunk.shape[0] != first.shape[0]):
            raise UnsupportedAudio(f"audio chunks must be [groups, {codec.channels}, samples] with a fixed number "
                                   f"of groups, got {tuple(chunk.shape)}")
        if not torch.isfinite(chunk).all():  # NaN would spread through the LSTM into every later frame
            at = total[0] + int((~torch.isfinite(chunk)).flatten(0, 1).any(0).nonzero()[0])
            raise UnsupportedAudio(f"audio has NaN or infinite samples (first at {at / codec.sample_rate:.3f} s "
                                   "at the codec rate); repair the signal before encoding")
        total[0] += chunk.shape[-1]
        if progress is not None:
            progress(chunk.shape[-1])
        if chunk.shape[-1]:
            yield chunk.to(codec.device, torch.float32)
        chunk = next(rest, None)


class _SegmentSink:
    """Collects finished segments, codes them in batches and writes them."""

    def __init__(self, writer: container.ContainerWriter, info: StreamInfo, lm: LanguageModel | None,
                 segments_coder: tp.Any) -> None:
        self.writer, self.info, self.lm, self.segments_coder = writer, info, lm, segments_coder
        self.pending: list[tuple[Tensor, Tensor | None, bytes]] = []
        self.batch = LM_BATCH if lm is not None else 1

    def add(self, codes: Tensor, scales: Tensor | None, correction: bytes = b"") -> None:
        """One segment's codes [G, K, F], volume scales [G] and coded envelope correction."""
        self.pending.append((codes.detach().cpu(), None if scales is None else scales.detach().cpu().float(),
                             correction))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        lm = None if self.lm is None else exactlm.exact(self.lm)  # the writer's LM arithmetic
        coded = self.segments_coder.encode_segments([c for c, _, _ in self.pending], lm, self.info.bits_per_code,
                                                    span=_span(self.info))
        for (codes, scales, correction), seg in zip(self.pending, coded):
            prefix = b"" if scales is None else np.ascontiguousarray(scales.numpy(), dtype="<f4").tobytes()
            self.writer.write_segment(prefix + correction + seg.payload, codes.shape[-1], codes.shape[0], seg.flags,
                                      seg.codes_crc)
            self.info.segments += 1
            self.info.frames += codes.shape[-1]
            self.info.lm_segments += seg.flags in container.LM_FLAGS
            self.info.envelope_bytes += len(correction)
        self.pending = []


def encode_stream(fo: tp.BinaryIO, codec: Codec, chunks: tp.Iterable[Tensor], *, bandwidth: float | None,
                  lm: LanguageModel | None, source_sample_rate: int, source_channels: int,
                  segment_seconds: float = 10.0, progress: tp.Callable[[int], None] | None = None,
                  segments_coder: tp.Any = None, source_length: tp.Callable[[], int] | None = None,
                  correct_envelope: bool | str | None = False) -> StreamInfo:
    """Encode audio chunks into an .ecdc stream written to `fo` (which need not seek).

    Args:
        fo: binary output; flushed after each written batch of segments.
        codec: the codec (any device); its `model_id`/`fingerprint` go into the header.
        chunks: audio at `codec.sample_rate`, each [G, codec.channels, t] with a fixed G.
        bandwidth: kbps (picks the number of codebooks); None uses all.
        lm: entropy-coding LM (runs on the CPU), or None for plain 10-bit packing.
        source_sample_rate, source_channels: of the original file, restored by the decoder.
        segment_seconds: causal codecs: length of a container segment (unit of damage and of
            random access; the LM restarts at each).
        progress: called with the number of samples of each chunk consumed.
        segments_coder: what codes the segments' codes: None for `neucodec.entropy`, or a lockstep
            run's shared view of it (`lockstep.SharedCoder`, which codes several files' segments at once).
        source_length: called once the chunks are exhausted: samples per channel of the original file,
            stored so that decoding restores its exact length after resampling. Not needed when the
            source rate is the codec's.
        correct_envelope: also store each segment's envelope correction (`envelope_settings`; format
            version 2): about 2.6 kbps more with table e4 (3.4 with e3), and the encoder runs the decoder too.
            None: if the codec's package opts in (`use_envelope`); a table name: with that table.
    Returns:
        the `StreamInfo` of the written stream (length, segments and bytes filled in).
    """
    n_q = codec.n_q_for_bandwidth(bandwidth)
    model_id, model_fp = model_identity(codec)
    lm_id, lm_fp = model_identity(lm) if lm is not None else (None, None)
    if lm is not None and lm.cfg.n_q < n_q:
        raise UnsupportedAudio(f"the LM models {lm.cfg.n_q} codebooks but {n_q} are coded; lower the bandwidth")
    it = iter(chunks)
    first = next(it, None)
    groups = int(first.shape[0]) if first is not None and first.dim() == 3 else 1
    cfg = codec.config
    causal = cfg.segment_length is None
    if causal and not cfg.seanet.causal:
        raise UnsupportedAudio(f"{cfg.name} is neither causal nor segmented; it cannot be encoded in a stream")
    seg_frames = max(1, round(segment_seconds * codec.frame_rate)) if causal else \
        -(-tp.cast(int, cfg.segment_length) // codec.hop_length)
    settings = use_envelope(codec, correct_envelope)
    if settings is not None:  # segments of whole tiles
        per_tile = settings["hop"] * settings["hops"] // codec.hop_length
        seg_frames = max(-(-seg_frames // per_tile), -(-8 // per_tile)) * per_tile
        if groups * codec.channels * settings["bands"] * seg_frames // per_tile > MAX_CORRECTIONS:
            raise UnsupportedAudio(f"{groups * codec.channels} channels in segments of {segment_seconds:g} s are too "
                                   "many for the envelope correction; encode with --no-envelope")
    coder = None if lm is None else {
        "name": "constriction.queue.RangeEncoder", "model": "Categorical(perfect=False)", "dtype": "float32",
        "prob_grid": entropy.PROB_GRID, "lm_threads": entropy.LM_THREADS, "word": "uint32le",
        "arithmetic": exactlm.NAME,
        "span_frames": entropy.lm_span(seg_frames, lm.cfg.past_context, codec.frame_rate)}
    info = StreamInfo(
        format_version=1, model_id=model_id, model_fingerprint=model_fp, lm_id=lm_id,
        lm_fingerprint=lm_fp, sample_rate=codec.sample_rate, channels=codec.channels, groups=groups,
        source_sample_rate=int(source_sample_rate), source_channels=int(source_channels),
        frame_rate=codec.frame_rate, hop_length=codec.hop_length, n_q=n_q, bandwidth=bandwidth,
        bits_per_code=int(math.log2(cfg.quantizer.bins)), layout="stream" if causal else "overlap",
        segment_frames=seg_frames, segment_length=cfg.segment_length, segment_stride=cfg.segment_stride,
        scales=bool(cfg.normalize), coder=coder, envelope=settings)
    if settings is not None:
        info.format_version = 2
    writer = container.ContainerWriter(fo, _header(info), info.format_version)
    sink = _SegmentSink(writer, info, lm, segments_coder or entropy)
    total = [0]
    audio = _counted(chunks, codec, first, it, progress, total)
    meter = None if settings is None else _EnvelopeMeter(codec, settings, seg_frames)
    with torch.inference_mode():
        if causal:
            buf: list[Tensor] = []
            have = 0
            for codes in codec.encode_stream(audio if meter is None else meter.watch(audio), n_q):
                buf.append(codes)
                have += codes.shape[-1]
                while have >= seg_frames:
                    allc = torch.cat(buf, -1)
                    segment = allc[..., :seg_frames]
                    sink.add(segment, None, b"" if meter is None else meter.segment(segment, False))
                    buf, have = [allc[..., seg_frames:]], have - seg_frames
            if have:
                segment = torch.cat(buf, -1)
                sink.add(segment, None, b"" if meter is None else meter.segment(segment, True))
        else:
            _encode_overlap(codec, audio, n_q, sink, total)
    sink.flush()
    length = total[0]
    if info.frames != -(-length // codec.hop_length) and causal:
        raise NeucodecError(f"internal error: {info.frames} frames for {length} samples")
    info.length = length
    if source_length is not None:
        info.source_length = source_length()
    elif source_sample_rate == codec.sample_rate:
        info.source_length = length
    info.bytes = writer.close(length, info.source_length)
    return info


def _encode_overlap(codec: Codec, audio: tp.Iterator[Tensor], n_q: int, sink: _SegmentSink, total: list[int]) -> None:
    """Segmented codec: cut the stream into overlapping segments and encode them a few at a time."""
    seg_len = tp.cast(int, codec.config.segment_length)
    stride = tp.cast(int, codec.config.segment_stride)
    buf = torch.zeros(0)
    buf_start = 0  # absolute sample index of buf[..., 0]
    next_offset = 0
    ready: list[Tensor] = []

    def run(batch: list[Tensor]) -> None:
        G = batch[0].shape[0]
        codes, scales = codec._encode_segments(torch.cat(batch, 0), n_q)
        for i in range(len(batch)):
            sink.add(codes[i * G:(i + 1) * G], None if scales is None else scales[i * G:(i + 1) * G])

    for chunk in audio:
        buf = chunk if buf.numel() == 0 else torch.cat([buf, chunk], -1)
        while buf_start + buf.shape[-1] >= next_offset + seg_len:
            ready.append(buf[..., next_offset - buf_start: next_offset - buf_start + seg_len])
            next_offset += stride
            if len(ready) >= LM_BATCH:
                run(ready)
                ready = []
        drop = next_offset - buf_start
        if drop > 0:
            buf = buf[..., drop:].clone()
            buf_start = next_offset
    if ready:
        run(ready)
    length = total[0]
    while next_offset < length:  # the shorter tail segments, each alone
        piece = buf[..., next_offset - buf_start: next_offset - buf_start + seg_len]
        run([piece])
        next_offset += stride


# ---------------------------------------------------------------- decoding
def _check_weights(model: torch.nn.Module, kind: tp.Literal["model", "LM"], name: str | None,
                   wanted: str | None) -> str:
    """The model's id, after checking it holds (or, by its `compatible` list, reads) the file's weights."""
    mid, fp = model_identity(model)
    if wanted is None or wanted == fp or wanted in getattr(model, "compatible", ()):
        return mid
    what = "encoded" if kind == "model" else "entropy-coded"
    release = getattr(model, "earlier", {}).get(wanted)
    if release:  # an earlier default model
        advice = (f"it is neucodec {release.get('neucodec', '?')}'s default model: decode with that release, or pass "
                  f"its weights (repository commit {release.get('commit', '?')}) with --model")
    elif name == mid:  # same name: an earlier release
        advice = "use the neucodec version that wrote it, or pass those weights with --model"
    else:
        advice = f"the given {kind} is {mid}; pass the matching weights"
    raise ModelMismatch(f"this file was {what} with {kind} {name} (weights {wanted}), which these weights "
                        f"({fp}) cannot read; {advice}")


def _check_model(codec: Codec, info: StreamInfo) -> None:
    mid = _check_weights(codec, "model", info.model_id, info.model_fingerprint)
    if (codec.sample_rate, codec.channels, codec.hop_length) != (info.sample_rate, info.channels, info.hop_length) \
            or codec.n_q < info.n_q:
        raise ModelMismatch(f"this file needs a {info.sample_rate} Hz, {info.channels}-channel model with hop "
                            f"{info.hop_length} and {info.n_q} codebooks ({info.model_id}); got {mid}")


def _resolve_codec(codec: Codec | None, info: StreamInfo) -> Codec:
    if codec is None:
        from .hub import load_codec
        codec = load_codec(info.model_id)
    _check_model(codec, info)
    return codec


def _resolve_lm(lm: LanguageModel | None, info: StreamInfo) -> LanguageModel:
    if info.lm_id is None:
        raise CorruptStream("a segment is LM-coded but the header names no LM (file damaged)")
    if lm is None:
        from .hub import load_lm
        lm = load_lm(info.lm_id)
    _check_weights(lm, "LM", info.lm_id, info.lm_fingerprint)
    return lm


# ---------------------------------------------------------------- envelope settings
def envelope_settings(codec: Codec, table: str | None = None) -> dict[str, tp.Any] | None:
    """The envelope correction a causal codec's files can get: with `table`, else the table its
    package names (`load_codec`'s `.envelope_table`), else "e1", on the grid that table was fitted on
    (`envelope.table_grid`; "e1": 400 Hz x 40 ms tiles to 8 kHz) with a hop of 10 ms at the codec's
    rate; None where tiles are not whole code frames or the codec is segmented."""
    if table is not None and table not in envelope.table_names():
        raise UnsupportedAudio(f"no envelope table {table[:20]!r}; choose one of {', '.join(envelope.table_names())}")
    if codec.config.segment_length is not None or codec.sample_rate % 100:
        return None
    name = table or getattr(codec, "envelope_table", None) or "e1"
    if name not in envelope.table_names():
        raise UnsupportedFormatVersion(f"{codec.config.name} asks for the envelope table {name[:20]!r}, which this "
                                       "neucodec does not have; upgrade neucodec")
    grid = dataclasses.replace(envelope.table_grid(name), hop=codec.sample_rate // 100)
    if grid.tile % codec.hop_length or grid.top > grid.hop:
        return None
    settings = {"table": name, "hop": grid.hop, "bins": grid.bins, "hops": grid.hops, "bands": grid.bands,
                "step_db": grid.step_db}
    if grid.wider:
        settings["wider"] = [list(pair) for pair in grid.wider]
    return settings


def use_envelope(codec: Codec, wanted: bool | str | None) -> dict[str, tp.Any] | None:
    """The envelope settings to encode with: None if not `wanted`, or if `wanted` is None and the
    codec's package does not opt in to the correction (`.envelope_table`: it is measured per model;
    neucodec's default model opts in); a table name: with that table (`envelope.table_names`);
    UnsupportedAudio if it is wanted and the codec cannot take it."""
    if wanted is None and getattr(codec, "envelope_table", None) is None:
        return None
    settings = None if wanted is False else envelope_settings(codec, wanted if isinstance(wanted, str) else None)
    if wanted and settings is None:
        raise UnsupportedAudio(f"{codec.config.name} cannot take an envelope correction (it needs a causal model "
                               "whose code frames tile 40 ms); encode with --no-envelope")
    return settings


def _envelope_grid(settings: dict[str, tp.Any], layout: str, hop_length: int,
                   segment_frames: int) -> tuple[envelope.Grid, np.ndarray]:
    """(grid, table) of header `envelope` settings, checked."""
    name = settings.get("table")
    if not isinstance(name, str) or name not in envelope.table_names():
        raise UnsupportedFormatVersion(f"header: unknown envelope table {str(name)[:20]!r}; upgrade neucodec")
    values = {}
    for key, hi in (("hop", 1 << 16), ("bins", 1 << 10), ("hops", 1 << 10), ("bands", 1 << 10)):
        v = settings.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
            raise CorruptStream(f"header: envelope field {key!r} has a bad value {str(v)[:20]!r}")
        values[key] = v
    step = settings.get("step_db")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step <= 48:
        raise CorruptStream(f"header: envelope field 'step_db' has a bad value {str(step)[:20]!r}")
    wider = settings.get("wider", [])
    if not (isinstance(wider, list) and len(wider) <= 16 and all(
            isinstance(pair, list) and len(pair) == 2 and all(type(v) is int and lo <= v <= 1 << 16
                                                              for v, lo in zip(pair, (0, 1)))
            for pair in wider)):
        raise CorruptStream(f"header: envelope field 'wider' has a bad value {str(wider)[:40]!r}")
    table = envelope.table(name)
    grid = envelope.Grid(step_db=float(step), max_steps=len(table) // 2, wider=tuple(map(tuple, wider)), **values)
    if layout != "stream" or grid.top > grid.hop or grid.tile % hop_length \
            or segment_frames * hop_length % grid.tile:
        raise CorruptStream("header: envelope tiles do not fit the segments (file damaged)")
    return grid, table


class _EnvelopeMeter:
    """Encoder side of the envelope correction: keeps the input audio, decodes each segment's codes
    (a decoder of its own, streaming) and codes the correction of the decoded audio."""

    def __init__(self, codec: Codec, settings: dict[str, tp.Any], segment_frames: int) -> None:
        self.codec = codec
        self.grid, self.table = _envelope_grid(settings, "stream", codec.hop_length, segment_frames)
        self.inputs: list[Tensor] = []
        self.state: tp.Any = None

    def watch(self, chunks: tp.Iterable[Tensor]) -> tp.Iterator[Tensor]:
        """Pass the audio through, keeping it until its segment is measured."""
        for chunk in chunks:
            self.inputs.append(chunk.detach().cpu())
            yield chunk

    def segment(self, codes: Tensor, final: bool) -> bytes:
        """The coded correction of the next segment's codes [G, K, F] (its input must have been seen).
        The decoder holds back nothing but a first step of under 8 frames, unless `final`: segments
        are longer (`encode_stream`)."""
        decoded, self.state = self.codec.decode_step(codes, self.state, final)
        x = torch.cat(self.inputs, -1) if self.inputs else torch.zeros(codes.shape[0], self.codec.channels, 0)
        n = min(x.shape[-1], codes.shape[-1] * self.codec.hop_length)  # the last segment: what is left
        self.inputs = [x[..., n:]]
        rows = x.shape[0] * x.shape[1]
        ref = x[..., :n].reshape(rows, n).double().numpy()
        out = decoded[..., :n].reshape(rows, n).double().cpu().numpy()
        steps = np.stack([envelope.measure(r, o, self.grid) for r, o in zip(ref, out)])
        payload = envelope.encode_steps(steps, self.table)
        if not np.array_equal(envelope.decode_steps(payload, self.table, *steps.shape), steps):
            raise NeucodecError("internal error: the envelope correction does not decode; encode with --no-envelope")
        return struct.pack("<I", len(payload)) + payload


def _correction_size(payload: bytes, where: str) -> int:
    """Bytes of the envelope corrections at the start of `payload` (a segment's, after its scales)."""
    (size,) = struct.unpack("<I", payload[:4]) if len(payload) >= 4 else (-1,)
    if size < 0 or size % 4 or 4 + size > len(payload):
        raise CorruptStream(f"{where}: envelope correction of a bad length (file damaged)")
    return size


def _envelope_steps(payload: bytes, info: StreamInfo, coding: tuple[envelope.Grid, np.ndarray], frames: int,
                    where: str) -> tuple[np.ndarray, bytes]:
    """Split a segment payload (after its scales) into its envelope corrections [G * C, bands, tiles]
    and the codes' payload; `coding`: the header's (grid, table), `_envelope_grid`."""
    grid, table = coding
    rows, tiles = info.groups * info.channels, -(-frames * info.hop_length // grid.tile)
    if rows * grid.bands * tiles > MAX_CORRECTIONS:
        raise CorruptStream(f"{where}: {rows * grid.bands * tiles} envelope corrections exceed the limit of "
                            f"{MAX_CORRECTIONS} per segment (file damaged)")
    size = _correction_size(payload, where)
    info.envelope_bytes += 4 + size
    return envelope.decode_steps(payload[4: 4 + size], table, rows, grid.bands, tiles), payload[4 + size:]


def _span(info: StreamInfo) -> int | None:
    """Frames per LM sequence (header `coder.span_frames`); None: one sequence per segment."""
    span = (info.coder or {}).get("span_frames")
    if span is None:
        return None
    if not isinstance(span, int) or isinstance(span, bool) or not 1 <= span <= 1 << 22:
        raise CorruptStream(f"header: bad coder span_frames {str(span)[:20]!r}")
    return span


def _payload_bound(info: StreamInfo, items: int, frames: int) -> int:
    corrections = 0 if info.envelope is None else 4 * items * info.channels * 1024 * frames  # far above any real one
    return 4 * items * info.scales + items * info.n_q * frames * 4 + corrections + 64


Segment = tuple[Tensor, "Tensor | None", "np.ndarray | None"]  # codes [G, K, F], scales [G], corrections


def _segment_codes(reader: container.ContainerReader, info: StreamInfo, lm_box: list[LanguageModel | None],
                   segments_coder: tp.Any) -> tp.Iterator[Segment]:
    """Read, check and decode segments (LM ones in batches): yields (codes [G, K, F], scales [G] | None,
    envelope corrections [G * C, bands, tiles] | None)."""
    G, K = info.groups, info.n_q
    batch: list[container.SegmentRecord] = []
    coding = None if info.envelope is None else \
        _envelope_grid(info.envelope, info.layout, info.hop_length, info.segment_frames)

    def decode(records: list[container.SegmentRecord]) -> list[Segment]:
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
            if coding is not None:
                steps, payload = _envelope_steps(payload, info, coding, r.frames, where)
            todo.append((r.flags, payload, (G, K, r.frames), where))
            scales.append(sc)
            corrections.append(steps)
        if any(t[0] in container.LM_FLAGS for t in todo) and lm_box[0] is None:
            lm_box[0] = _resolve_lm(None, info)
        codes = segments_coder.decode_segments(todo, lm_box[0], info.bits_per_code, span=_span(info))
        out = []
        for r, c, sc, steps in zip(records, codes, scales, corrections):
            if entropy.codes_crc32(c) != r.codes_crc:
                raise CorruptStream(f"segment {r.index} at byte {r.offset}: decoded codes fail their CRC "
                                    "(LM probabilities differ from the encoder's machine, or file damaged)")
            out.append((c, sc, steps))
        return out

    for record in reader:
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
        if len(batch) >= LM_BATCH or record.flags not in container.LM_FLAGS:
            yield from decode(batch)
            batch = []
    if batch:
        yield from decode(batch)


def _check_end(reader: container.ContainerReader, info: StreamInfo) -> int:
    end = tp.cast(container.EndRecord, reader.end)
    length = end.length
    if info.layout == "stream":
        expected = -(-length // info.hop_length)
    else:
        stride, seg_len = tp.cast(int, info.segment_stride), tp.cast(int, info.segment_length)
        n = -(-length // stride) if length else 0
        expected = 0 if n == 0 else (n - 1) * -(-seg_len // info.hop_length) + \
            -(-(length - (n - 1) * stride) // info.hop_length)
    if end.frames != info.frames or expected != info.frames:
        raise CorruptStream(f"end marker at byte {end.offset}: says {length} samples ({expected} frames) but the "
                            f"segments hold {info.frames} frames (file damaged)")
    info.length = length
    if end.source_residue is not None:
        info.source_length = _source_length(length, end.source_residue, info, end.offset)
    # end record, index record (8 bytes per segment) and trailer
    info.bytes = end.offset + 2 * container.RECORD_HEAD_BYTES + 12 + 8 * info.segments + container.TRAILER_BYTES
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


def _audio(codes_iter: tp.Iterator[Segment], codec: Codec, info: StreamInfo,
           finish: tp.Callable[[], int]) -> tp.Iterator[Tensor]:
    """Codes of consecutive segments -> audio chunks [G, C, t], trimmed to the final length (and with
    the envelope corrections applied, when the segments have them)."""
    device = codec.device
    emitted = 0

    def trim(chunk: Tensor, final: bool) -> Tensor:
        nonlocal emitted
        if final:
            length = finish()
            chunk = chunk[..., : max(0, length - emitted)]
        emitted += chunk.shape[-1]
        return chunk

    with torch.inference_mode():
        if info.layout == "stream":
            if info.envelope is None:
                yield from _stream_audio((c for c, _, _ in codes_iter), codec, trim, finish)
                return
            grid, _ = _envelope_grid(info.envelope, info.layout, info.hop_length, info.segment_frames)
            corrector = envelope.Corrector(grid, info.groups * info.channels)

            def pieces() -> tp.Iterator[Tensor]:
                for c, _, steps in codes_iter:
                    corrector.add(tp.cast(np.ndarray, steps))  # before the audio they correct
                    yield c

            shape = (info.groups, info.channels, -1)
            for chunk in _stream_audio(pieces(), codec, trim, finish):
                out = corrector.push(chunk.reshape(-1, chunk.shape[-1]).double().numpy())
                if out.shape[-1]:
                    yield torch.from_numpy(out.astype(np.float32)).reshape(shape)
            out = corrector.finish()
            if out.shape[-1]:
                yield torch.from_numpy(out.astype(np.float32)).reshape(shape)
            return
        stride = tp.cast(int, info.segment_stride)
        out: Tensor | None = None  # pending samples from absolute position `base`
        weight_sum: Tensor | None = None
        base = 0
        ramp: Tensor | None = None
        pending = next(codes_iter, None)
        index = 0
        while pending is not None:
            following = next(codes_iter, None)
            codes, scale, _ = pending
            frame = codec._decode_segments(codes.to(device), None if scale is None else scale.to(device)).float().cpu()
            if ramp is None:
                t = torch.linspace(0, 1, frame.shape[-1] + 2, dtype=frame.dtype)[1:-1]
                ramp = 0.5 - (t - 0.5).abs()
            offset = index * stride - base
            n = frame.shape[-1]
            if out is None:
                out, weight_sum = frame.new_zeros(*frame.shape[:-1], n), frame.new_zeros(n)
            need = offset + n
            if need > out.shape[-1]:
                out = torch.cat([out, out.new_zeros(*out.shape[:-1], need - out.shape[-1])], -1)
                weight_sum = torch.cat([tp.cast(Tensor, weight_sum), weight_sum.new_zeros(need - weight_sum.shape[-1])])
            out[..., offset: offset + n] += ramp[:n] * frame
            tp.cast(Tensor, weight_sum)[offset: offset + n] += ramp[:n]
            index += 1
            if following is None:
                yield trim(out / weight_sum, True)
                out = None
            else:
                done = index * stride - base  # samples before the next segment's start are final
                yield trim(out[..., :done] / tp.cast(Tensor, weight_sum)[:done], False)
                out, weight_sum = out[..., done:].clone(), tp.cast(Tensor, weight_sum)[done:].clone()
                base += done
            pending = following
        if index == 0:
            finish()


def _stream_audio(codes: tp.Iterator[Tensor], codec: Codec, trim: tp.Callable[[Tensor, bool], Tensor],
                  finish: tp.Callable[[], int]) -> tp.Iterator[Tensor]:
    """A causal codec's audio of consecutive code pieces, trimmed (`_audio`)."""
    stream = codec.decode_stream(c.to(codec.device) for c in codes)
    prev = next(stream, None)
    emitted = False
    while prev is not None:
        following = next(stream, None)
        yield trim(prev.float().cpu(), following is None)
        emitted, prev = True, following
    if not emitted:
        finish()


def decode_stream(fi: tp.BinaryIO, codec: Codec | None = None, lm: LanguageModel | None = None, *,
                  v0_lm_threads: int | None = None,
                  segments_coder: tp.Any = None) -> tuple[StreamInfo, tp.Iterator[Tensor]]:
    """Read an .ecdc stream (v1, or a reference v0 file) and decode it chunk by chunk.

    Args:
        fi: binary input (a pipe is fine).
        codec: the codec to use; None loads the one the header names (`hub.load_codec`).
        lm: the entropy-coding LM; None loads the one the header names when a segment needs it
            (for a reference file coded with the LM: the official `encodec_lm_24khz`/`_48khz`).
        v0_lm_threads: reference files coded with the LM only: the torch thread count the writer's
            LM ran with (their probabilities depend on it; see `neucodec.v0lm`). None: the
            environment variable `NEUCODEC_V0_LM_THREADS`, else this process's torch thread count
            (what the reference tool itself would use here).
        segments_coder: what decodes the segments' codes (`encode_stream`).
    Returns:
        (info, chunks): audio chunks [G, C, t] at the codec rate, `info.length` samples in all;
        `info.length` and the totals are filled in once the iterator is exhausted.
    Raises:
        CorruptStream, UnsupportedFormatVersion, ModelMismatch: with a one-line message.
    """
    prelude = container.read_prelude(fi)
    if prelude.version == 0:
        return _decode_v0(fi, prelude, codec, lm, v0_lm_threads)
    info = _info_from_header(prelude.header, prelude.version)
    codec = _resolve_codec(codec, info)
    lm_box: list[LanguageModel | None] = [None if lm is None or info.lm_id is None else _resolve_lm(lm, info)]
    reader = container.ContainerReader(fi, prelude)
    codes = _segment_codes(reader, info, lm_box, segments_coder or entropy)

    def finish() -> int:
        for _ in codes:  # pragma: no cover - all consumed already
            pass
        return _check_end(reader, info)

    return info, _guard(_audio(codes, codec, info, finish))


def _guard(it: tp.Iterator[Tensor]) -> tp.Iterator[Tensor]:
    """Turn low-level failures on hostile input into CorruptStream (never a bare traceback)."""
    try:
        yield from it
    except NeucodecError:
        raise
    except (ValueError, RuntimeError, IndexError, OverflowError, struct.error) as e:
        raise CorruptStream(f"undecodable stream ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None


def read_info(fi: tp.BinaryIO) -> StreamInfo:
    """Header plus totals (length, segments, bytes), checking every CRC, without decoding audio."""
    prelude = container.read_prelude(fi)
    if prelude.version == 0:
        return _v0_info(prelude.header, None)
    info = _info_from_header(prelude.header, prelude.version)
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


# ---------------------------------------------------------------- version 0 (reference encodec)
_V0_MODELS = {"encodec_24khz": (24000, 1, False), "encodec_48khz": (48000, 2, True)}


def _v0_info(h: dict[str, tp.Any], codec: Codec | None) -> StreamInfo:
    name = h.get("m")
    if name not in _V0_MODELS:
        raise CorruptStream(f"reference .ecdc header names an unknown model {str(name)[:40]!r}")
    al, nc, use_lm = h.get("al"), h.get("nc"), h.get("lm")
    if not isinstance(al, int) or isinstance(al, bool) or not 0 <= al < 1 << 40:
        raise CorruptStream(f"reference .ecdc header: bad audio length {str(al)[:40]!r}")
    if not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= 32:
        raise CorruptStream(f"reference .ecdc header: bad number of codebooks {str(nc)[:40]!r}")
    if not isinstance(use_lm, bool):
        raise CorruptStream("reference .ecdc header: bad 'lm' flag")
    sr, ch, segmented = _V0_MODELS[name]
    hop = 320
    frame_rate = math.ceil(sr / hop)
    return StreamInfo(
        format_version=0, model_id=name, model_fingerprint=None, lm_id=f"encodec_lm_{name[8:]}" if use_lm else None,
        lm_fingerprint=None, sample_rate=sr, channels=ch, groups=1, source_sample_rate=sr, source_channels=ch,
        frame_rate=frame_rate, hop_length=hop, n_q=nc, bandwidth=nc * frame_rate * 10 / 1000, bits_per_code=10,
        layout="overlap" if segmented else "stream", segment_frames=150 if segmented else max(1, -(-al // hop)),
        segment_length=sr if segmented else None, segment_stride=int(0.99 * sr) if segmented else None,
        scales=segmented, coder={"name": "encodec-arithmetic-v0"} if use_lm else None, length=al)


def _decode_v0(fi: tp.BinaryIO, prelude: container.Prelude, codec: Codec | None, lm: LanguageModel | None = None,
               lm_threads: int | None = None) -> tuple[StreamInfo, tp.Iterator[Tensor]]:
    info = _v0_info(prelude.header, codec)
    threads = _v0_threads(lm_threads) if info.coder is not None else 0
    if codec is None:
        from .hub import load_codec
        codec = load_codec(info.model_id)
    expect = _V0_MODELS[info.model_id]
    if (codec.sample_rate, codec.channels, codec.config.normalize) != expect or codec.hop_length != 320 \
            or codec.n_q < info.n_q:
        raise ModelMismatch(f"this reference file needs {info.model_id}; the given model is "
                            f"{getattr(codec, 'model_id', codec.config.name)}")
    if lm is not None and info.coder is not None:
        _check_v0_lm(lm, info)
    length, K = tp.cast(int, info.length), info.n_q
    pos = [prelude.size]

    def read(n: int, what: str) -> bytes:
        data = container.read_exactly(fi, n, f"{what} at byte {pos[0]}")
        pos[0] += n
        return data

    def codes_iter() -> tp.Iterator[Segment]:
        if info.coder is not None:
            yield from _v0_lm_codes(fi, prelude.size, info, lm, threads)
            return
        if info.layout == "stream":
            frames = -(-length // 320)
            for start in range(0, frames, _V0_CHUNK_FRAMES):
                F = min(_V0_CHUNK_FRAMES, frames - start)
                nbytes = entropy.packed_size(1, K, F)
                data = read(nbytes, "segment 0")
                if F < _V0_CHUNK_FRAMES:  # last piece: the padding bits of the flush must be zero
                    yield entropy.unpack(data, 1, K, F, where=f"segment 0 at byte {pos[0] - nbytes}"), None, None
                else:
                    yield entropy.unpack(data, 1, K, F), None, None
            return
        seg_len, stride = tp.cast(int, info.segment_length), tp.cast(int, info.segment_stride)
        for i, offset in enumerate(range(0, length, stride)):
            F = -(-min(length - offset, seg_len) // 320)
            (scale,) = struct.unpack("!f", read(4, f"segment {i} scale"))
            if not math.isfinite(scale):
                raise CorruptStream(f"segment {i} at byte {pos[0] - 4}: invalid volume scale")
            data = read(entropy.packed_size(1, K, F), f"segment {i}")
            yield entropy.unpack(data, 1, K, F, where=f"segment {i}"), torch.tensor([scale]), None

    def finish() -> int:
        return length

    it = codes_iter()
    if length == 0:
        return info, iter([])
    return info, _guard(_audio(it, codec, info, finish))


def _v0_threads(threads: int | None) -> int:
    if threads is None:
        env = os.environ.get("NEUCODEC_V0_LM_THREADS", "").strip()
        if not env:
            return torch.get_num_threads()
        if not env.isdigit() or not 1 <= int(env) <= 1024:
            raise NeucodecError(f"NEUCODEC_V0_LM_THREADS={env[:20]!r}: expected a thread count from 1 to 1024")
        return int(env)
    if not 1 <= threads <= 1024:
        raise NeucodecError(f"v0_lm_threads={threads}: expected a thread count from 1 to 1024")
    return threads


def _check_v0_lm(lm: LanguageModel, info: StreamInfo) -> None:
    """The LM must have the official layout the reference builds for the file's model."""
    c = lm.cfg
    past = int(3.5 * info.frame_rate)
    weight = lm.transformer.norm_in.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ModelMismatch(f"the LM must be on the CPU in float32 to decode reference files (got {weight.device}, "
                            f"{weight.dtype}); load it with neucodec.hub.load_lm")
    if c.card != 1024 or c.n_q < info.n_q or c.past_context != past or c.tie_embeddings:
        raise ModelMismatch(f"this reference file was entropy-coded with the official LM {info.lm_id} (past context "
                            f"{past}, {info.n_q} codebooks); the given LM is {model_identity(lm)[0]} (past context "
                            f"{c.past_context}, {c.n_q} codebooks)")


def _v0_lm_codes(fi: tp.BinaryIO, start: int, info: StreamInfo, lm: LanguageModel | None,
                 threads: int) -> tp.Iterator[Segment]:
    """Codes of a reference file coded with the LM: yields (codes [1, K, f], scale [1] | None, None)."""
    if lm is None:
        from .hub import load_lm
        try:
            lm = load_lm(tp.cast(str, info.lm_id))
        except NeucodecError as e:
            raise type(e)(f"this reference file was entropy-coded with {info.lm_id}, which is needed to decode "
                          f"it: {e}") from None
        _check_v0_lm(lm, info)
    length, K = tp.cast(int, info.length), info.n_q
    stream = v0lm.ReferenceLM(lm, K)
    source = v0lm.ByteSource(fi, start)
    if info.layout == "stream":
        for piece in v0lm.decode_segment(source, stream, -(-length // 320), "segment 0", threads, _V0_CHUNK_FRAMES):
            yield torch.from_numpy(piece)[None], None, None
    else:
        seg_len, stride = tp.cast(int, info.segment_length), tp.cast(int, info.segment_stride)
        for i, offset in enumerate(range(0, length, stride)):
            F = -(-min(length - offset, seg_len) // 320)
            (scale,) = struct.unpack("!f", source.read(4, f"segment {i} scale"))
            if not math.isfinite(scale):
                raise CorruptStream(f"segment {i} at byte {source.offset - 4}: invalid volume scale")
            pieces = list(v0lm.decode_segment(source, stream, F, f"segment {i}", threads, F))
            yield torch.from_numpy(pieces[0])[None], torch.tensor([scale]), None
    v0lm.check_end(source)


# ---------------------------------------------------------------- convenience
def encode_bytes(codec: Codec, wav: Tensor, bandwidth: float | None, lm: LanguageModel | None = None,
                 **kw: tp.Any) -> bytes:
    """Whole signal [G, C, T] -> .ecdc bytes (keyword arguments go to `encode_stream`)."""
    if wav.dim() != 3:
        raise UnsupportedAudio(f"expected audio [groups, channels, samples], got {tuple(wav.shape)}")
    kw.setdefault("source_sample_rate", codec.sample_rate)
    kw.setdefault("source_channels", wav.shape[0] * wav.shape[1])
    chunk = int(kw.pop("chunk_seconds", 10.0) * codec.sample_rate)
    buf = io.BytesIO()
    encode_stream(buf, codec, wav.split(chunk, -1) if wav.shape[-1] else [], bandwidth=bandwidth, lm=lm, **kw)
    return buf.getvalue()


def decode_bytes(data: bytes, codec: Codec | None = None, lm: LanguageModel | None = None,
                 **kw: tp.Any) -> tuple[StreamInfo, Tensor]:
    """.ecdc bytes -> (info, audio [G, C, length]) (keyword arguments go to `decode_stream`)."""
    info, chunks = decode_stream(io.BytesIO(data), codec, lm, **kw)
    parts = list(chunks)
    if not parts:
        return info, torch.zeros(info.groups, info.channels, 0)
    return info, torch.cat(parts, -1)
