"""audio_io: reading every format and stdin, regrouping channels, resampling, writing files and streams."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from neucodec import audio_io
from neucodec.errors import UnsupportedAudio, UnsupportedSetting

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", ["wav_mono", "flac_stereo", "ogg", "mp3", "wav_stereo"])
def test_reads_every_format(recordings: dict[str, Path], key: str) -> None:
    x, sr = audio_io.load(recordings[key])
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] > 1000
    assert x.shape[0] == (2 if "stereo" in key else 1)
    assert sr == sf.info(str(recordings[key])).samplerate


@pytest.mark.parametrize("content, match", [
    (b"", "not audio"), (b"hello, I am text\n" * 10, "not audio"), (bytes(range(256)) * 4, "not audio"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not audio"),
])
def test_bad_files_are_unsupported_audio(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(UnsupportedAudio, match=match):
        audio_io.load(p)


def test_missing_folder_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedAudio, match="does not exist"):
        audio_io.load(tmp_path / "nope.wav")
    with pytest.raises(UnsupportedAudio, match="is a folder"):
        audio_io.load(tmp_path)
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(UnsupportedAudio, match="no audio"):
        audio_io.load(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused_with_their_time(tmp_path: Path, bad: float) -> None:
    x = np.zeros((3 * audio_io.BLOCK, 2), np.float32)
    x[audio_io.BLOCK + 1600, 1] = bad  # in the second block, 0.1 s into it at 16 kHz
    p = tmp_path / "float.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    at = (audio_io.BLOCK + 1600) / 16000
    with pytest.raises(UnsupportedAudio, match=f"NaN or infinite samples \\(first at {at:.3f} s\\)"):
        audio_io.load(p)


def test_damaged_flac_is_one_line_error(recordings: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(recordings["flac_stereo"].read_bytes())
    cut = tmp_path / "cut.flac"
    cut.write_bytes(bytes(data[: len(data) // 2]) + b"\x00" * 5000)
    with pytest.raises(UnsupportedAudio) as e:
        audio_io.load(cut)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("channels, codec_channels, groups", [(1, 1, 1), (2, 1, 2), (5, 1, 5), (1, 2, 1),
                                                                (2, 2, 1), (3, 2, 2)])
def test_groups_round_trip(channels: int, codec_channels: int, groups: int) -> None:
    x = np.random.default_rng(0).standard_normal((channels, 37)).astype(np.float32)
    g = audio_io.to_groups(x, codec_channels)
    assert g.shape == (groups, codec_channels, 37)
    assert groups == audio_io.groups_for(channels, codec_channels)
    np.testing.assert_allclose(audio_io.from_groups(g, channels), x)


@pytest.mark.parametrize("src, dst", [(44100, 24000), (22050, 24000), (24000, 24000), (8000, 48000)])
def test_streaming_resampler_matches_length(src: int, dst: int) -> None:
    x = np.random.default_rng(1).standard_normal((2, src)).astype(np.float32)
    r = audio_io.Resampler(src, dst, 2)
    parts = [r(x[:, i: i + 1000]) for i in range(0, src, 1000)] + [r(x[:, :0], last=True)]
    y = np.concatenate(parts, axis=1)
    assert y.shape == (2, audio_io.expected_length(src, src, dst))


def test_fit_length() -> None:
    blocks = [np.ones((1, 5), np.float32)] * 3
    assert sum(b.shape[1] for b in audio_io.fit_length(blocks, 12)) == 12
    assert sum(b.shape[1] for b in audio_io.fit_length(blocks, 20)) == 20


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_stream_wav_writer_is_readable(subtype: str, tmp_path: Path) -> None:
    x = np.clip(np.random.default_rng(2).standard_normal((2, 3000)) * 0.2, -0.9, 0.9).astype(np.float32)
    for frames in (3000, None):  # exact header, and the streaming 0xFFFFFFFF header
        buf = io.BytesIO()
        with audio_io.AudioWriter(buf, 16000, 2, "WAV", subtype, frames=frames) as w:
            w.write(x[:, :1000])
            w.write(x[:, 1000:])
        p = tmp_path / f"s{frames}.wav"
        p.write_bytes(buf.getvalue())
        y, sr = sf.read(p, dtype="float32", always_2d=True)
        assert sr == 16000 and y.shape == (3000, 2)
        np.testing.assert_allclose(y.T, x, atol=1e-4 if subtype == "PCM_16" else 1e-6)
    with audio_io.AudioWriter(tmp_path / "file.wav", 16000, 2, "WAV", subtype) as w:  # soundfile's conversion
        w.write(x)
    file, _ = sf.read(tmp_path / "file.wav", dtype="float32", always_2d=True)
    np.testing.assert_array_equal(y, file)  # a pipe gets the samples a file gets


def test_file_writer_clips_and_counts(tmp_path: Path) -> None:
    p = tmp_path / "o.flac"
    with audio_io.AudioWriter(p, 8000, 1, "FLAC", "PCM_16") as w:
        w.write(np.array([[0.5, 1.5, -2.0]], np.float32))
    assert w.clipped == 2
    assert sf.read(p)[0].max() <= 1.0


def test_output_format_rules() -> None:
    assert audio_io.output_format("a.wav") == ("WAV", "PCM_16")
    assert audio_io.output_format("a.FLAC", "pcm_24") == ("FLAC", "PCM_24")
    assert audio_io.output_format("-", "FLOAT") == ("WAV", "FLOAT")
    for path, sub, match in [("a.mp4", None, "cannot write .mp4 .*; name the output .wav, .flac or .ogg"),
                             ("a.flac", "FLOAT", "FLAC cannot"), ("a.wav", "PCM_8", "unknown subtype"),
                             ("a.ogg", "PCM_16", "OGG output is lossy and has no subtype=")]:
        with pytest.raises(UnsupportedSetting, match=match):  # what was asked for, whatever the audio: usage
            audio_io.output_format(path, sub)
    assert audio_io.output_format("a.ogg") == ("OGG", "VORBIS")


READ_STDIN = ("import sys; from neucodec import audio_io\n"
              "r = audio_io.open_audio('-'); x = r.read_all(); print(r.sample_rate, *x.shape)")


@pytest.mark.parametrize("key", ["wav_mono", "flac_stereo", "ogg", "mp3"])
def test_reads_stdin_pipes(recordings: dict[str, Path], key: str) -> None:
    """Pipes (not redirected files): WAV and OGG stream, FLAC and MP3 are spooled."""
    data = recordings[key].read_bytes()
    p = subprocess.run([sys.executable, "-c", READ_STDIN], input=data, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    sr, c, t = map(int, p.stdout.split())
    info = sf.info(str(recordings[key]))
    assert (sr, c) == (info.samplerate, info.channels) and t > 1000


def test_reads_piped_wav_with_unknown_length(recordings: dict[str, Path]) -> None:
    """ffmpeg and sox write 0 or 0xFFFFFFFF sizes into piped WAV headers."""
    data = bytearray(recordings["wav_mono"].read_bytes())
    n = sf.info(str(recordings["wav_mono"])).frames
    data[4:8] = b"\xff\xff\xff\xff"
    data[40:44] = b"\xff\xff\xff\xff"
    p = subprocess.run([sys.executable, "-c", READ_STDIN], input=bytes(data), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert int(p.stdout.split()[2]) == n


def test_empty_stdin_is_clear_error() -> None:
    p = subprocess.run([sys.executable, "-c", READ_STDIN], input=b"", capture_output=True, timeout=60)
    assert p.returncode != 0 and b"stdin is empty" in p.stderr
