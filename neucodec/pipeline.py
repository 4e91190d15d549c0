"""File to file: `encode_file` (audio -> .ecdc) and `decode_file` (.ecdc -> audio), the whole data path.

Encode: `audio_io.open_audio` -> blocks -> resample/regroup for the codec -> `writer.encode_stream`
-> atomic write. Decode: `reader.decode_stream` -> regroup -> resample back to the source rate ->
`audio_io.AudioWriter` -> atomic write. Both stream in blocks, so `-` (stdin/stdout) works with bounded
memory and a causal model produces output before its input ends. The codec runs on the chosen device;
the entropy-coding LM always runs on the CPU so files decode the same everywhere. `encode_calls` and
`decode_calls` are the same paths yielding their model calls, which a folder run batches across
files (`neucodec.engine`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from . import archive, audio_io, engine, rate
from .atomic import atomic_output, check_target, disk_error
from .errors import (
    NeucodecError,
    UnknownModel,
    UnsupportedAudio,
    UnsupportedSetting,
    UsageError,
    WeightsUnavailable,
    option,
)
from .hub import load_codec, load_lm, pick_device
from .model import Codec
from .probe import Recorded
from .weights import DEFAULT_MODEL, known_names

if tp.TYPE_CHECKING:
    from .lm import LanguageModel
    from .streamspec import EncodeSettings, StreamInfo

PathLike = tp.Union[str, "os.PathLike[str]"]
Notify = tp.Callable[[str], None]
#: Files longer than this get their own progress bar when `progress=True`.
LONG_FILE_SECONDS = 30.0


@dataclasses.dataclass
class FileResult:
    """What one encode or decode did."""

    source: str
    target: str
    info: StreamInfo
    seconds: float  # audio duration
    bytes: int  # size of the .ecdc stream
    elapsed: float  # wall-clock seconds
    notes: list[str] = dataclasses.field(default_factory=list)
    point: rate.OperatingPoint | None = None  # encoding: the operating point rate control chose
    target_kbps: float | None = None  # encoding: the file bitrate asked for
    sample_rate: int | None = None  # decoding: the sample rate of the audio written
    channels: int | None = None  # decoding: the channels of the audio written
    damage: list[str] = dataclasses.field(default_factory=list)  # decoding with salvage: each lost span, a line

    @property
    def kbps(self) -> float:
        """Actual bitrate of the .ecdc stream, header included."""
        return 8 * self.bytes / max(self.seconds, 1e-9) / 1000


# ------------------------------------------------------------------------------------------ models
_CODECS: dict[tuple[str, str], Codec] = {}
_LMS: dict[str, LanguageModel] = {}


def get_codec(model: PathLike | None, device: torch.device, fingerprint: str | None = None) -> Codec:
    """The codec for a model name or path on `device`, loaded once per process; with the
    `fingerprint` of a file's weights that it does not read, an earlier default's decode side that
    does, where one is installed (`neucodec.archive`)."""
    key = (str(model or DEFAULT_MODEL), str(device))
    if model is None and DEFAULT_MODEL not in known_names():
        raise WeightsUnavailable(f"the default model {DEFAULT_MODEL} is not installed; pass {option('-m/--model')} "
                                 "with a model name from `neucodec models` or a weights path")
    if key not in _CODECS:
        _CODECS[key] = load_codec(key[0], device=device)
    codec = _CODECS[key]
    side = archive.stand_in(codec, key[0], fingerprint)
    return codec if side is None else get_codec(side, device)


def get_lm(model: PathLike | None) -> LanguageModel:
    """The entropy-coding LM for a model name or path (CPU, float32), loaded once per process."""
    key = str(model or DEFAULT_MODEL)
    if key not in _LMS:
        _LMS[key] = load_lm(key)
    return _LMS[key]


# ------------------------------------------------------------------------------------------ helpers
def _is_stdio(path: PathLike) -> bool:
    return str(path) == audio_io.STDIO


def _binary_stdout() -> tp.BinaryIO:
    if sys.stdout.isatty():
        raise UsageError("refusing to write binary data to a terminal; redirect stdout (> file) or give OUT")
    return sys.stdout.buffer


def _check_paths(src: PathLike, dst: PathLike, force: bool, what: str,
                 error: type[NeucodecError] = NeucodecError) -> None:
    """Input first (a missing input is the more useful message, an `error`), then the output rules."""
    if not _is_stdio(src):
        p = Path(src)
        if not p.exists():
            raise error(f"{p} does not exist; check the path")
        if not p.is_file():
            raise error(f"{p} is not a file; give {what} file, or folders as both IN and OUT")
    if not _is_stdio(dst):
        check_target(Path(dst), force, None if _is_stdio(src) else Path(src))


_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]"


class _Bar:
    """A tqdm bar in seconds of audio, or nothing."""

    def __init__(self, enabled: bool, total: float | None, desc: str) -> None:
        self._bar = None
        if enabled and (total is None or total >= LONG_FILE_SECONDS):
            from tqdm import tqdm

            self._bar = tqdm(total=None if total is None else round(total, 1), unit="s", desc=desc,
                             leave=False, file=sys.stderr, dynamic_ncols=True,
                             bar_format=_BAR_FORMAT if total else "{desc}: {n:.0f} s [{elapsed}]")

    def update(self, seconds: float) -> None:
        if self._bar is not None:
            self._bar.update(seconds)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _translate(e: BaseException, target: str) -> NeucodecError | None:
    """Turn memory and disk failures into one-line errors."""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return NeucodecError("the device ran out of memory; use --device cpu, fewer --jobs, or shorter files")
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError) and target != audio_io.STDIO:
        return disk_error(e, Path(target))
    return None


# ------------------------------------------------------------------------------------------- encode
def encode_file(src: PathLike, dst: PathLike, **kw: tp.Any) -> FileResult:
    """Compress an audio file (or `-` for stdin) into an .ecdc file (or `-` for stdout).

    Args:
        model: model name or weights path; None is the default model.
        bandwidth: the target bitrate of the whole file in kbps (all channels, header and envelope
            correction included), any value from the model's lowest operating point up; None: the
            package's `default_kbps` (`default_kbps`). Rate control (`neucodec.rate`) picks the
            codebooks, the correction and the LM (when `use_lm`) that score best within it, checks the
            file it wrote and steps down a point if a file came out too large.
        use_lm: entropy-code with the model's LM (smaller, slower; runs on the CPU).
        envelope: restrict rate control to points with the envelope correction (True), without it
            (False) or with that table (e1, e2, e3, e4); None: whichever scores best.
        settings: the codes and correction chosen by the caller (`streamspec.encode_settings`):
            no rate control, and `bandwidth` and `envelope` are not used.
        force: replace an existing `dst`.
        progress: show a bar for long files on stderr.
        notify: called with one-line notes (resampling, per-channel bitrate).
        lm: the model's LM, already loaded (`get_lm`).
        segment_seconds: a causal model's container segment (`writer.encode_stream`).
    Returns:
        FileResult with the stream's StreamInfo, the audio duration and the stream size.
    """
    return engine.complete(encode_calls(src, dst, **kw))


def encode_calls(src: PathLike, dst: PathLike, *, model: PathLike | None = None, bandwidth: float | None = None,
                 use_lm: bool = False, device: str | torch.device = "auto", force: bool = False,
                 progress: bool = False, notify: Notify | None = None, lm: LanguageModel | None = None,
                 segment_seconds: float | None = None, envelope: bool | str | None = None,
                 settings: EncodeSettings | None = None) -> tp.Generator[engine.Call, None, FileResult]:
    """`encode_file`, yielding its model calls (`neucodec.engine`)."""
    t0 = time.perf_counter()
    src, dst = str(src), str(dst)
    _check_paths(src, dst, force, "an audio", UnsupportedAudio)
    if not _is_stdio(dst) and Path(dst).suffix.lower() in audio_io.AUDIO_EXTENSIONS:
        raise UsageError(f"{dst} is named as audio, but encoding writes an .ecdc file; name it "
                         f"{Path(dst).with_suffix('.ecdc')}")
    codec = get_codec(model, pick_device(device))
    target = default_kbps(codec) if bandwidth is None else float(bandwidth)
    if settings is not None:  # the caller chose the codes and correction: no rate control
        fixed = settings
        return (yield from _encode_once(src, dst, codec, lambda reader: (fixed, lm, None, []), force, progress,
                                        notify, segment_seconds, t0))
    points, measured = rate.model_points(codec, envelope)
    rate.check_target(points, target, lm=use_lm)
    _point_settings(codec, points[0], None)  # a correction the model cannot take: fail before reading
    if use_lm and lm is None:
        lm = get_lm(model)
    tried: list[rate.OperatingPoint] = []

    def pick(reader: audio_io.AudioReader) -> tuple[EncodeSettings, LanguageModel | None, rate.OperatingPoint,
                                                   list[str]]:
        channels = reader.channels if codec.channels == 1 else 1
        wanted, notes = target, []
        low = rate.minimum_kbps(points, channels, lm=use_lm)
        if bandwidth is None and target < low:  # the default target, too low for this many channels
            wanted = low
            notes.append(f"{reader.name}: {reader.channels} channels need at least {wanted:g} kbps; coded at that")
        try:
            point = rate.choose(points, wanted, channels=channels, seconds=reader.seconds, lm=use_lm,
                                below=tried[-1] if tried else None)
        except UnsupportedSetting:
            if tried or not reader.seconds:
                raise
            # a short file: its header alone leaves too little of the target; code it as a long one
            point = rate.choose(points, wanted, channels=channels, lm=use_lm)
            notes.append(f"{reader.name}: {reader.seconds:.2f} s is too short for {wanted:g} kbps with its header; "
                         "coded as a long file")
        tried.append(point)
        return _point_settings(codec, point, lm), lm if point.lm else None, point, notes

    result = yield from _encode_once(src, dst, codec, pick, force, progress, notify, segment_seconds, t0)
    # a file harder than the dev split: step down while a lower point fits (a pipe cannot be read or
    # written twice)
    while measured and not _is_stdio(src) and not _is_stdio(dst) \
            and not rate.within_target(result.bytes, result.seconds, target):
        try:
            result = yield from _encode_once(src, dst, codec, pick, True, progress, notify, segment_seconds, t0)
        except UnsupportedSetting:  # no lower point: keep the lowest
            result.notes.append(f"{src}: {result.kbps:.2f} kbps, above the target of {target:g} kbps (the lowest "
                                "operating point that fits it was not low enough for this file)")
            break
    result.target_kbps = target
    return result


def _point_settings(codec: Codec, point: rate.OperatingPoint, lm: LanguageModel | None) -> EncodeSettings:
    from .streamspec import encode_settings

    bandwidths = [b for b in codec.config.bandwidths if codec.n_q_for_bandwidth(b) == point.codebooks]
    if not bandwidths:
        raise UnsupportedSetting(f"operating point of {point.codebooks} codebooks: not a bandwidth of the model; "
                                 "measure its points again (bin/fit_rate.py)")
    return encode_settings(codec, bandwidths[0], point.envelope or False, lm if point.lm else None)


Pick = tp.Callable[[audio_io.AudioReader],
                   tuple["EncodeSettings", "LanguageModel | None", "rate.OperatingPoint | None", list[str]]]


def _encode_once(src: str, dst: str, codec: Codec, pick: Pick, force: bool, progress: bool, notify: Notify | None,
                 segment_seconds: float | None, t0: float) -> tp.Generator[engine.Call, None, FileResult]:
    """Encode once, with the settings `pick` chooses for the opened input."""
    from .writer import encode_calls

    with audio_io.open_audio(src) as reader:
        settings, lm, point, notes = pick(reader)
        notes = _encode_notes(reader, codec, settings.bandwidth) + notes
        for n in notes:
            if notify:
                notify(n)
        bar = _Bar(progress, reader.seconds, Path(src).name if not _is_stdio(src) else "stdin")
        chunks = _codec_chunks(reader, codec, bar)
        kwargs: dict[str, tp.Any] = dict(settings=settings, lm=lm, source_sample_rate=reader.sample_rate,
                                         source_channels=reader.channels, source_length=lambda: reader.frames_read)
        if segment_seconds is not None:
            kwargs["segment_seconds"] = segment_seconds
        try:
            if _is_stdio(dst):
                out = _binary_stdout()
                info = yield from encode_calls(out, codec, chunks, **kwargs)
                out.flush()
            else:
                with atomic_output(Path(dst), force) as tmp, open(tmp, "wb") as fo:
                    info = yield from encode_calls(fo, codec, chunks, **kwargs)
        except (RuntimeError, OSError) as e:
            err = _translate(e, dst)
            if err is None:
                raise
            raise err from None
        finally:
            bar.close()
    seconds = (info.length or 0) / info.sample_rate
    return FileResult(src, dst, info, seconds, int(info.bytes), time.perf_counter() - t0, notes, point)


def default_kbps(codec: Codec) -> float:
    """The file bitrate a file gets when none is asked for: the package's `default_kbps`, else the
    default bandwidth of its codes (`Codec.default_bandwidth`, which `Codec.encode` uses)."""
    return getattr(codec, "default_kbps", None) or codec.default_bandwidth


def _encode_notes(reader: audio_io.AudioReader, codec: Codec, bandwidth: float | None) -> list[str]:
    notes = []
    if reader.sample_rate != codec.sample_rate:
        notes.append(f"{reader.name}: resampling {reader.sample_rate} Hz -> {codec.sample_rate} Hz for the model "
                     f"(decoding restores {reader.sample_rate} Hz)")
    groups = audio_io.groups_for(reader.channels, codec.channels)
    if groups > 1:
        unit = "mono" if codec.channels == 1 else f"{codec.channels}-channel"
        rates = "all codebooks each" if bandwidth is None else \
            f"{bandwidth:g} kbps of codes each, {groups * bandwidth:g} kbps of codes in total"
        notes.append(f"{reader.name}: {reader.channels} channels coded as {groups} {unit} streams: {rates}")
    elif reader.channels < codec.channels:
        notes.append(f"{reader.name}: mono input duplicated to {codec.channels} channels for the model "
                     "(decoding restores mono)")
    return notes


def _codec_chunks(reader: audio_io.AudioReader, codec: Codec, bar: _Bar) -> tp.Iterator[torch.Tensor]:
    """Source blocks -> `[G, codec.channels, t]` float32 chunks at the codec rate, on the codec's device."""
    resample = audio_io.Resampler(reader.sample_rate, codec.sample_rate, reader.channels)
    device = codec.device

    def chunk(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(audio_io.to_groups(x, codec.channels).copy()).to(device)

    for block in reader.blocks():
        y = resample(block)
        if y.shape[1]:
            yield chunk(y)
        bar.update(block.shape[1] / reader.sample_rate)
    tail = resample(np.zeros((reader.channels, 0), np.float32), last=True)
    if tail.shape[1]:
        yield chunk(tail)


# ------------------------------------------------------------------------------------------- decode
def decode_file(src: PathLike, dst: PathLike, **kw: tp.Any) -> FileResult:
    """Decompress an .ecdc file (or `-` for stdin) into WAV/FLAC (or WAV on stdout for `-`).

    The output has the source's sample rate and channel count unless `sample_rate` is given.
    `model` overrides the weights named in the file (a path to the same weights, e.g.); the LM, if the
    file was coded with one, is loaded on the CPU. A damaged file raises `DamagedStream` naming the
    damaged span, and nothing is written; with `salvage` it is decoded through the damage: each lost
    span becomes silence of its length (every intact segment decodes as in the undamaged file) and is
    named in a line to `notify` and in the result's `damage`.

    Keyword arguments: model, device, force, subtype, sample_rate, progress, notify (as
    `encode_file`'s), lm (the model's LM, already loaded), salvage.
    """
    return engine.complete(decode_calls(src, dst, **kw))


def decode_calls(src: PathLike, dst: PathLike, *, model: PathLike | None = None,
                 device: str | torch.device = "auto", force: bool = False, subtype: str | None = None,
                 sample_rate: int | None = None, progress: bool = False, notify: Notify | None = None,
                 lm: LanguageModel | None = None, salvage: bool = False) -> tp.Generator[engine.Call, None, FileResult]:
    """`decode_file`, yielding its model calls (`neucodec.engine`)."""
    from . import salvage as salvaging
    from .errors import DamagedStream
    from .reader import decode_calls as read_calls
    from .reader import read_header, read_info

    t0 = time.perf_counter()
    src, dst = str(src), str(dst)
    fmt, subtype = audio_io.output_format(dst, subtype)
    _check_paths(src, dst, force, "an .ecdc")
    on = pick_device(device)  # an unavailable GPU fails before any reading
    notes: list[str] = []
    damage: list[str] = []

    def lost(line: str) -> None:
        damage.append(f"{audio_io.describe(src)}: {line}")
        if notify:
            notify(f"warning: {damage[-1]}")

    stdin = _is_stdio(src)
    fi = sys.stdin.buffer if stdin else open(src, "rb")
    try:
        known: StreamInfo | None = None
        header: StreamInfo | None = None
        if not stdin:  # a file: read the totals first (CRCs only, no decoding) for exact lengths
            known = header = salvaging.read_info(fi) if salvage else read_info(fi)
            fi.seek(0)
        elif model is None:  # a pipe: the header names the model; it is read again below
            recorded = Recorded(fi)
            header = salvaging.read_header(recorded) if salvage else read_header(recorded)
            fi = recorded.again()
        if lm is None and model is not None and (known is None or known.lm_id):
            lm = _optional_lm(model)
        try:
            if model is not None:
                codec = get_codec(model, on)
            else:  # a file's or a pipe's header, read above
                named_in = tp.cast("StreamInfo", header)
                codec = get_codec(named_in.model_id, on, named_in.model_fingerprint)
            info, chunks = read_calls(fi, codec=codec, lm=lm, salvage=salvage, on_lost=lost)
        except (UnknownModel, WeightsUnavailable) as e:
            if model is not None:
                raise
            named = f"model {header.model_id}" if header is not None else "a model"
            raise WeightsUnavailable(f"{audio_io.describe(src)} was encoded with {named}, which is not installed "
                                     f"here; pass {option('-m/--model')} with its weights (see `neucodec models`)") \
                from e
        out_rate = sample_rate or info.source_sample_rate or info.sample_rate
        channels = info.source_channels or info.channels

        def output_length(i: StreamInfo) -> int | None:  # exact at the source rate when the stream says it
            if i.length is None:
                return None
            if i.source_length is not None and out_rate == i.source_sample_rate:
                return i.source_length
            return audio_io.expected_length(i.length, i.sample_rate, out_rate)

        # a file's totals are known before decoding; a pipe's once its end record is read
        total = output_length(known) if known is not None else None
        bar = _Bar(progress, None if known is None else known.duration, "stdin" if stdin else Path(src).name)
        blocks = audio_io.fit_length(_audio_blocks(chunks, info, out_rate, channels, bar),
                                     total if known is not None else lambda: output_length(info))
        try:
            if _is_stdio(dst):
                writer = audio_io.AudioWriter(_binary_stdout(), out_rate, channels, fmt, subtype, frames=total)
                with writer:
                    yield from _write(blocks, writer)
            else:
                with atomic_output(Path(dst), force, suffix=Path(dst).suffix) as tmp:
                    with audio_io.AudioWriter(tmp, out_rate, channels, fmt, subtype) as writer:
                        yield from _write(blocks, writer)
        except (RuntimeError, OSError) as e:
            err = _translate(e, dst)
            if err is None:
                raise
            raise err from None
        finally:
            bar.close()
    except DamagedStream as e:  # named, with its span in seconds; nothing was written
        raise salvaging.in_file(e, audio_io.describe(src), None if stdin else fi) from None
    finally:
        if not stdin:
            fi.close()
    if writer.clipped:
        notes.append(f"{dst}: {writer.clipped} samples clipped to [-1, 1]; use {option('--subtype', 'FLOAT')} "
                     "to keep them")
    for n in notes:
        if notify:
            notify(n)
    final = known if known is not None else info
    return FileResult(src, dst, final, (final.length or 0) / final.sample_rate, int(final.bytes),
                      time.perf_counter() - t0, notes, sample_rate=out_rate, channels=channels, damage=damage)


def _write(blocks: tp.Iterable[np.ndarray | engine.Call], writer: audio_io.AudioWriter) -> tp.Iterator[engine.Call]:
    for b in blocks:
        if isinstance(b, engine.Call):
            yield b
        else:
            writer.write(b)


def _optional_lm(model: PathLike) -> LanguageModel | None:
    """The LM packaged with `model`, or None when it has none (the stream may not need one)."""
    try:
        return get_lm(model)
    except WeightsUnavailable:
        return None


def _audio_blocks(chunks: tp.Iterable[torch.Tensor | engine.Call], info: StreamInfo, out_rate: int, channels: int,
                  bar: _Bar) -> tp.Iterator[np.ndarray | engine.Call]:
    """Decoded `[G, C, t]` chunks -> `[channels, t]` float32 blocks at `out_rate`; calls pass on."""
    resample = audio_io.Resampler(info.sample_rate, out_rate, channels)
    for chunk in chunks:
        if isinstance(chunk, engine.Call):
            yield chunk
            continue
        x = audio_io.from_groups(chunk.detach().float().cpu().numpy(), channels)
        bar.update(x.shape[1] / info.sample_rate)
        y = resample(x)
        if y.shape[1]:
            yield y
    tail = resample(np.zeros((channels, 0), np.float32), last=True)
    if tail.shape[1]:
        yield tail
