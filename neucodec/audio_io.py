"""Audio files in and out: read any file or stdin, convert rate and channels for a codec, write WAV/FLAC/stdout.

This is the only module that touches soundfile and soxr. Audio is float32 `[C, T]` (channels first)
everywhere outside this module. Reading and converting stream in blocks, so memory stays bounded for
long files and pipes.

Pipes (soundfile 0.14 / libsndfile 1.2.2, checked by hand): WAV (even with a zero or garbage length in
its header, as ffmpeg and sox write into pipes) and OGG (Vorbis, Opus) stream from a non-seekable
stdin; FLAC and MP3 need a seekable file, so a piped FLAC/MP3 is first spooled to a temporary file.
libsndfile cannot write WAV into a pipe, so WAV for stdout is written here, header and all.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import sys
import tempfile
import threading
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import UnsupportedAudio, UnsupportedSetting, option

STDIO = "-"
BLOCK = 1 << 15  # frames read per block
#: The audio formats read (through libsndfile), by name -> their file extensions; the one list that
#: `neucodec encode --help`, the folder mode and the check of an encoder's output name use.
INPUT_FORMATS = {"WAV": (".wav",), "FLAC": (".flac",), "OGG/Opus": (".ogg", ".oga", ".opus"), "MP3": (".mp3",),
                 "AIFF": (".aif", ".aiff"), "AU": (".au",), "W64": (".w64",), "RF64": (".rf64",)}
#: File extensions the folder mode picks up as audio input.
AUDIO_EXTENSIONS = tuple(ext for exts in INPUT_FORMATS.values() for ext in exts)
#: Output containers by extension -> (soundfile format, default subtype); `neucodec decode --format` offers these.
OUTPUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")
_STREAMABLE_MAGIC = (b"RIFF", b"RF64", b"OggS")


def one_of(items: tp.Iterable[str]) -> str:
    """"a, b or c"."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def describe(path: str | os.PathLike[str], output: bool = False) -> str:
    """A path for messages; `-` is stdin or stdout."""
    return ("stdout" if output else "stdin") if str(path) == STDIO else str(path)


# ----------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class AudioReader:
    """An open audio source. `frames` is None when unknown (pipes, compressed formats)."""

    sample_rate: int
    channels: int
    frames: int | None
    format: str
    name: str
    _file: sf.SoundFile
    _cleanup: list[tp.Callable[[], None]] = dataclasses.field(default_factory=list)
    frames_read: int = 0  # samples per channel delivered by `blocks` so far

    @property
    def seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.sample_rate

    def blocks(self, frames: int = BLOCK) -> tp.Iterator[np.ndarray]:
        """Float32 blocks `[C, t]` until the end of the audio. Raises UnsupportedAudio on decode errors."""
        total = 0
        while True:
            try:
                block = self._file.read(frames, dtype="float32", always_2d=True)
            except (sf.SoundFileError, RuntimeError) as e:
                raise UnsupportedAudio(f"{self.name}: audio data is damaged ({_reason(e)}); "
                                       "re-export or repair the file") from None
            if len(block):
                if not np.isfinite(block).all():  # float files only; NaN would spread through the LSTM
                    at = total + int(np.argmax(~np.isfinite(block).all(axis=1)))
                    raise UnsupportedAudio(f"{self.name} has NaN or infinite samples (first at "
                                           f"{at / self.sample_rate:.3f} s); repair or re-export the file")
                total += len(block)
                self.frames_read = total
                yield np.ascontiguousarray(block.T)
            if len(block) < frames:
                break
        if total == 0:
            raise UnsupportedAudio(f"{self.name} holds no audio samples (0 frames); check the file")

    def read_all(self) -> np.ndarray:
        """The whole signal `[C, T]`."""
        return np.concatenate(list(self.blocks()), axis=1)

    def close(self) -> None:
        self._file.close()
        for fn in self._cleanup:
            fn()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # libsndfile repeats the file name: "Error opening 'x.wav': Format not recognised."
    if ": " in text and text.startswith("Error opening"):
        text = text.split(": ", 1)[1]
    return text.rstrip(".")


def open_audio(path: str | os.PathLike[str]) -> AudioReader:
    """Open an audio file (any format soundfile reads) or `-` for stdin."""
    name = describe(path)
    cleanup: list[tp.Callable[[], None]] = []
    if str(path) == STDIO:
        source: tp.Any = _stdin_source(cleanup)
    else:
        p = Path(path)
        if not p.exists():
            raise UnsupportedAudio(f"{p} does not exist; check the path")
        if p.is_dir():
            raise UnsupportedAudio(f"{p} is a folder; give a file (folders need a folder as OUT too)")
        if not os.access(p, os.R_OK):
            raise UnsupportedAudio(f"{p} is not readable; check its permissions")
        source = str(p)
    try:
        f = sf.SoundFile(source, closefd=False) if isinstance(source, int) else sf.SoundFile(source)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        for fn in cleanup:
            fn()
        raise UnsupportedAudio(f"{name} is not audio that neucodec can read ({_reason(e)}); "
                               "use WAV, FLAC, OGG or MP3") from None
    if f.samplerate <= 0 or f.channels <= 0:
        f.close()
        raise UnsupportedAudio(f"{name} has an invalid header ({f.samplerate} Hz, {f.channels} channels)")
    # Header frame counts are unreliable for pipes and compressed formats (evaluation.md §6).
    exact_frames = f.seekable() and f.format in ("WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64")
    frames: int | None = f.frames if exact_frames else None
    if frames == 0:
        f.close()
        for fn in cleanup:
            fn()
        raise UnsupportedAudio(f"{name} holds no audio samples (0 frames); check the file")
    return AudioReader(f.samplerate, f.channels, frames, f.format, name, f, cleanup)


def _stdin_source(cleanup: list[tp.Callable[[], None]]) -> int:
    """A file descriptor libsndfile can read stdin from: stdin itself, a relay pipe, or a spool file."""
    fd = sys.stdin.fileno()
    if os.isatty(fd):
        raise UnsupportedAudio("stdin is a terminal; pipe audio into neucodec or give a file name")
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        return fd  # a redirected file: libsndfile reads it directly
    except OSError:
        pass
    head = b""
    while len(head) < 12:
        more = os.read(fd, 12 - len(head))
        if not more:
            break
        head += more
    if not head:
        raise UnsupportedAudio("stdin is empty; pipe audio into neucodec")
    if head[:4] in _STREAMABLE_MAGIC:
        return _relay(head, fd, cleanup)
    return _spool(head, fd, cleanup)


def _relay(head: bytes, fd: int, cleanup: list[tp.Callable[[], None]]) -> int:
    """A fresh pipe carrying `head` + the rest of `fd`, fed by a thread (libsndfile streams WAV/OGG from pipes)."""
    r, w = os.pipe()

    def pump() -> None:
        try:
            os.write(w, head)
            while chunk := os.read(fd, 1 << 16):
                os.write(w, chunk)
        except OSError:
            pass  # reader closed early
        finally:
            os.close(w)

    thread = threading.Thread(target=pump, name="neucodec-stdin", daemon=True)
    thread.start()

    def close() -> None:
        try:
            os.close(r)
        except OSError:
            pass

    cleanup.append(close)
    return r


def _spool(head: bytes, fd: int, cleanup: list[tp.Callable[[], None]]) -> int:
    """Copy stdin into an anonymous temporary file (FLAC, MP3: libsndfile must seek)."""
    tmp = tempfile.TemporaryFile(prefix="neucodec-stdin-")
    tmp.write(head)
    with os.fdopen(os.dup(fd), "rb") as src:
        shutil.copyfileobj(src, tmp, 1 << 20)
    tmp.flush()
    tmp.seek(0)
    cleanup.append(tmp.close)
    return tmp.fileno()


def load(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """The whole file as float32 `[C, T]` and its sample rate."""
    with open_audio(path) as reader:
        return reader.read_all(), reader.sample_rate


# -------------------------------------------------------------------------------------- converting
def groups_for(source_channels: int, codec_channels: int) -> int:
    """Channel groups G a codec codes for a source: a mono codec codes each channel on its own."""
    return max(1, -(-source_channels // codec_channels)) if source_channels >= codec_channels else 1


def to_groups(x: np.ndarray, codec_channels: int) -> np.ndarray:
    """`[C, t]` -> `[G, codec_channels, t]`: per channel for mono codecs; for stereo codecs mono
    duplicated and an odd channel repeated."""
    C, t = x.shape
    if codec_channels == 1:
        return x[:, None, :]
    G = groups_for(C, codec_channels)
    need = G * codec_channels
    if C < need:
        x = np.concatenate([x] + [x[-1:]] * (need - C), axis=0)
    return x.reshape(G, codec_channels, t)


def from_groups(y: np.ndarray, source_channels: int) -> np.ndarray:
    """Inverse of `to_groups`: `[G, codec_channels, t]` -> `[source_channels, t]` (duplicates averaged)."""
    G, Cm, t = y.shape
    if Cm > 1 and source_channels < Cm and G == 1:
        return y[0].mean(axis=0, keepdims=True) if source_channels == 1 else y[0, :source_channels]
    return y.reshape(G * Cm, t)[:source_channels]


class Resampler:
    """Streaming soxr (HQ) resampler for `[C, t]` blocks; identity when the rates match."""

    def __init__(self, in_rate: int, out_rate: int, channels: int) -> None:
        self.in_rate, self.out_rate, self.channels = in_rate, out_rate, channels
        self._stream = (soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32", quality="HQ")
                        if in_rate != out_rate else None)

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return x
        y = self._stream.resample_chunk(np.ascontiguousarray(x.T), last=last)
        return np.ascontiguousarray(y.T.reshape(self.channels, -1))


def expected_length(length: int, in_rate: int, out_rate: int) -> int:
    """Samples after resampling `length` samples (what soxr produces for a whole signal)."""
    return length if in_rate == out_rate else round(length * out_rate / in_rate)


def fit_length(blocks: tp.Iterable[tp.Any], length: int | tp.Callable[[], int | None],
               reserve: int = 4096) -> tp.Iterator[tp.Any]:
    """Trim or zero-pad a stream of `[C, t]` blocks to exactly `length` samples. Items that are not
    arrays (the model calls of `neucodec.engine`) pass on at once.

    A callable `length` is asked once the blocks are exhausted (None: leave them as they are); until
    then the last `reserve` samples are held back so that the end can still be trimmed.
    """
    done = 0
    channels = 1
    if callable(length):
        pending: list[np.ndarray] = []
        held = 0
        for b in blocks:
            if not isinstance(b, np.ndarray):
                yield b
                continue
            channels = b.shape[0]
            pending.append(b)
            held += b.shape[1]
            while held - pending[0].shape[1] >= reserve:
                first = pending.pop(0)
                held -= first.shape[1]
                done += first.shape[1]
                yield first
        target = length()
        blocks, length = pending, done + held if target is None else target
    for b in blocks:
        if not isinstance(b, np.ndarray):
            yield b
            continue
        channels = b.shape[0]
        b = b[:, : max(0, length - done)]
        done += b.shape[1]
        if b.shape[1]:
            yield b
    if done < length:
        yield np.zeros((channels, length - done), dtype=np.float32)


# ----------------------------------------------------------------------------------------- writing
def output_format(path: str | os.PathLike[str], subtype: str | None = None,
                  default_ext: str = ".wav") -> tuple[str, str]:
    """(soundfile format, subtype) for an output path from its extension; stdout is WAV."""
    ext = default_ext if str(path) == STDIO else Path(path).suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise UnsupportedSetting(f"cannot write {ext or 'files without an extension'} ({describe(path)}); "
                                 f"name the output {one_of(OUTPUT_FORMATS)}")
    fmt, default = OUTPUT_FORMATS[ext]
    if subtype is None:
        return fmt, default
    subtype = subtype.upper()
    if fmt == "OGG":
        raise UnsupportedSetting(f"OGG output is lossy and has no {option('--subtype')}; write .wav or .flac for "
                                 f"{'/'.join(SUBTYPES)}")
    if subtype not in SUBTYPES:
        raise UnsupportedSetting(f"unknown subtype {subtype}; use one of {', '.join(SUBTYPES)}")
    if fmt == "FLAC" and subtype == "FLOAT":
        raise UnsupportedSetting(f"FLAC cannot hold FLOAT samples; use {option('--subtype', 'PCM_24')} or write a .wav")
    return fmt, subtype


class AudioWriter:
    """Writes `[C, t]` float32 blocks to a file (soundfile) or a binary stream (WAV written here).

    Samples are clipped to [-1, 1] for integer subtypes; `clipped` counts the samples that were.
    """

    def __init__(self, target: str | os.PathLike[str] | tp.BinaryIO, sample_rate: int, channels: int,
                 fmt: str = "WAV", subtype: str = "PCM_16", frames: int | None = None) -> None:
        self.sample_rate, self.channels, self.fmt, self.subtype = sample_rate, channels, fmt, subtype
        self.clipped = 0
        self.written = 0
        self._sf: sf.SoundFile | None = None
        self._stream: tp.BinaryIO | None = None
        if isinstance(target, (str, os.PathLike)):
            self._sf = sf.SoundFile(str(target), "w", samplerate=sample_rate, channels=channels,
                                    format=fmt, subtype=subtype)
        else:
            if fmt != "WAV":
                raise UnsupportedAudio(f"{fmt} cannot be written to a stream here; write WAV to stdout")
            self._stream = target
            self._frames = frames
            self._stream.write(wav_header(sample_rate, channels, subtype, frames))

    def write(self, block: np.ndarray) -> None:
        if block.shape[0] != self.channels:
            raise ValueError(f"block has {block.shape[0]} channels, writer {self.channels}")
        x = block.astype(np.float32, copy=False)
        if self.subtype != "FLOAT":
            over = np.abs(x) > 1.0
            n = int(over.sum())
            if n:
                self.clipped += n
                x = np.clip(x, -1.0, 1.0)
        self.written += x.shape[1]
        if self._sf is not None:
            self._sf.write(x.T)
        else:
            assert self._stream is not None
            self._stream.write(pcm_bytes(x, self.subtype))

    def close(self) -> None:
        if self._sf is not None:
            self._sf.close()
        elif self._stream is not None:
            if self._frames != self.written and _seekable(self._stream):
                # stdout redirected to a file: patch the sizes of a streaming header
                end = self._stream.tell()
                self._stream.seek(end - self.written * self.channels * _SAMPLE_BYTES[self.subtype] - 44)
                self._stream.write(wav_header(self.sample_rate, self.channels, self.subtype, self.written))
                self._stream.seek(end)
            self._stream.flush()

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SAMPLE_BYTES = {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}


def _seekable(stream: tp.BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (OSError, ValueError):
        return False


def wav_header(sample_rate: int, channels: int, subtype: str, frames: int | None) -> bytes:
    """A 44-byte RIFF/WAVE header. Unknown or > 4 GiB lengths are written as 0xFFFFFFFF (streaming WAV)."""
    width = _SAMPLE_BYTES[subtype]
    tag = 3 if subtype == "FLOAT" else 1
    data = 0xFFFFFFFF if frames is None else frames * channels * width
    riff = 0xFFFFFFFF if data + 36 > 0xFFFFFFFF else data + 36
    data = min(data, 0xFFFFFFFF)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, tag, channels, sample_rate,
                                    sample_rate * channels * width, channels * width, 8 * width)
            + b"data" + struct.pack("<I", data))


def pcm_bytes(x: np.ndarray, subtype: str) -> bytes:
    """Interleaved little-endian samples of `[C, t]` float32 in [-1, 1], converted as libsndfile
    converts them (scaled by 2^15 or 2^23 and rounded down), so a stream holds the samples a file
    written by soundfile holds."""
    inter = np.ascontiguousarray(x.T)
    if subtype == "FLOAT":
        return inter.astype("<f4").tobytes()
    if subtype == "PCM_16":
        return np.clip(np.floor(inter * 32768.0), -32768, 32767).astype("<i2").tobytes()
    v = np.clip(np.floor(inter.astype(np.float64) * 8388608.0), -8388608, 8388607).astype("<i4")
    return v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
