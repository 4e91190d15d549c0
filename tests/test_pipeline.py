"""pipeline: file round trips for every input kind, channel/rate restoration, safe writes, devices."""
from __future__ import annotations

import json
import os
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import copy_package

from neucodec import audio_io, decode_file, encode_file, pipeline
from neucodec.errors import (
    DeviceUnavailable,
    NeucodecError,
    OutputError,
    UnsupportedAudio,
    UnsupportedSetting,
    UsageError,
    WeightsUnavailable,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", ["wav_mono", "flac_stereo", "ogg", "mp3"])
def test_round_trip_restores_rate_channels_length(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path,
                                                  key: str) -> None:
    src = recordings[key]
    ref, sr = audio_io.load(src)
    enc = encode_file(src, tmp_path / "a.ecdc", model=tiny_model, device="cpu")
    assert enc.info.source_sample_rate == sr and enc.info.groups == ref.shape[0]
    assert enc.bytes == (tmp_path / "a.ecdc").stat().st_size
    dec = decode_file(tmp_path / "a.ecdc", tmp_path / "b.wav", model=tiny_model, device="cpu")
    out, out_sr = sf.read(tmp_path / "b.wav", always_2d=True)
    assert out_sr == sr and out.shape[1] == ref.shape[0]
    assert out.shape[0] == ref.shape[1]  # exact, also after resampling back (the end record's residue)
    assert dec.seconds == pytest.approx(ref.shape[1] / sr, abs=1e-3)


@pytest.mark.parametrize("sr", [8000, 44100, 48000, 192000])
def test_exact_length_after_resampling(tiny_model: Path, tmp_path: Path, sr: int) -> None:
    """Every length comes back exactly, though resampling to 24 kHz and back rounds; stdin too."""
    for n in (1, 3, 4801, sr + 1):
        x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
        sf.write(tmp_path / "in.wav", x, sr)
        res = encode_file(tmp_path / "in.wav", tmp_path / "a.ecdc", model=tiny_model, force=True)
        assert res.info.source_length == n
        decode_file(tmp_path / "a.ecdc", tmp_path / "out.wav", model=tiny_model, force=True)
        assert sf.info(str(tmp_path / "out.wav")).frames == n
    naive = audio_io.expected_length(audio_io.expected_length(n, sr, 24000), 24000, sr)
    blocks = audio_io.fit_length(iter([np.zeros((1, naive), np.float32)]), lambda: n, reserve=2)
    assert sum(b.shape[1] for b in blocks) == n  # how a pipe's decode trims once the end record is read


def test_stereo_model_on_mono_and_lm(recordings: dict[str, Path], tiny_stereo_model: Path, tiny_model: Path,
                                     tmp_path: Path) -> None:
    notes: list[str] = []
    encode_file(recordings["wav_mono"], tmp_path / "s.ecdc", model=tiny_stereo_model, device="cpu", notify=notes.append)
    assert any("duplicated" in n for n in notes)
    decode_file(tmp_path / "s.ecdc", tmp_path / "s.flac", model=tiny_stereo_model, subtype="PCM_24")
    assert sf.info(str(tmp_path / "s.flac")).channels == 1
    x, sr = sf.read(recordings["wav_mono"], frames=sf.info(str(recordings["wav_mono"])).samplerate // 2)
    sf.write(tmp_path / "short.wav", x, sr)  # the LM coder is slow: half a second
    res = encode_file(tmp_path / "short.wav", tmp_path / "l.ecdc", model=tiny_model, use_lm=True, bandwidth=3.0)
    assert res.info.lm_id is not None and res.info.n_q == 4
    decode_file(tmp_path / "l.ecdc", tmp_path / "l.wav", model=tiny_model, sample_rate=16000)
    assert sf.info(str(tmp_path / "l.wav")).samplerate == 16000


def test_per_channel_bitrate_note(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    result = encode_file(recordings["flac_stereo"], tmp_path / "a.ecdc", model=tiny_model, notify=notes.append)
    total = 2 * tp.cast(float, result.info.bandwidth)
    assert total <= 6.0  # the two channels share the default target of 6 kbps
    assert any("2 mono streams" in n and f"{total:g} kbps of codes in total" in n for n in notes), notes


def test_a_package_names_the_bitrate_used_when_none_is_asked_for(recordings: dict[str, Path], tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    meta = json.loads(tiny_model.read_text())

    def package(**values: tp.Any) -> Path:
        path = tmp_path / f"{values!r}" / tiny_model.name
        path.parent.mkdir()
        shutil.copy(tiny_model.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
        path.write_text(json.dumps({**meta, **values}))
        return path

    # default_kbps (a file bitrate), else default_bandwidth (of the codes), else 6 kbps where offered
    for values, kbps in (({"default_kbps": 4.0}, 4.0), ({"default_bandwidth": 3.0}, 3.0),
                         ({"default_bandwidth": None}, 6.0)):
        result = encode_file(recordings["wav_mono"], tmp_path / f"{kbps}.ecdc", model=package(**values))
        assert result.target_kbps == kbps
    for bad in (4.5, True, "3"):  # not one of the codec's bandwidths (1.5, 3, 6)
        with pytest.raises(WeightsUnavailable, match="'default_bandwidth' must be one of the codec's bandwidths"):
            encode_file(recordings["wav_mono"], tmp_path / "bad.ecdc", model=package(default_bandwidth=bad))
    for bad in (0, True, "3"):
        with pytest.raises(WeightsUnavailable, match="'default_kbps' must be a positive number"):
            encode_file(recordings["wav_mono"], tmp_path / "bad.ecdc", model=package(default_kbps=bad))
    assert not (tmp_path / "bad.ecdc").exists()


def test_overwrite_rules_and_same_file(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.ecdc"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists; pass force=True to overwrite it$"):  # the Python argument
        encode_file(recordings["wav_mono"], out, model=tiny_model)
    assert out.read_bytes() == b"keep me"
    encode_file(recordings["wav_mono"], out, model=tiny_model, force=True)
    assert out.read_bytes()[:4] == b"NCDC"
    with pytest.raises(OutputError, match="input file"):
        encode_file(recordings["wav_mono"], recordings["wav_mono"], model=tiny_model, force=True)
    with pytest.raises(OutputError, match="does not exist"):
        encode_file(recordings["wav_mono"], tmp_path / "no" / "a.ecdc", model=tiny_model)


def test_failure_leaves_nothing(tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk" * 10)
    with pytest.raises(UnsupportedAudio):
        encode_file(bad, tmp_path / "bad.ecdc", model=tiny_model)
    corrupt = tmp_path / "c.ecdc"
    corrupt.write_bytes(b"NCDC" + os.urandom(200))
    with pytest.raises(NeucodecError):
        decode_file(corrupt, tmp_path / "c.wav", model=tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav", "c.ecdc"]


def test_disk_full_is_reported(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from neucodec import writer

    def full(fo, *a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")
        yield  # a generator, as the writer's

    monkeypatch.setattr(writer, "encode_calls", full)
    with pytest.raises(OutputError, match="disk full"):
        encode_file(recordings["wav_mono"], tmp_path / "a.ecdc", model=tiny_model)
    assert list(tmp_path.iterdir()) == []


def test_devices() -> None:
    assert pipeline.pick_device("cpu").type == "cpu"
    assert pipeline.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UnsupportedSetting, match="unknown device"):  # a usage mistake (the CLI exits 2)
        pipeline.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="device='cuda:0': CUDA is not available"):
            pipeline.pick_device("cuda:0")


def test_decode_runs_on_the_device_asked_for_without_a_model(recordings: dict[str, Path], tiny_model: Path,
                                                             tmp_path: Path, model_cache: Path) -> None:
    name = copy_package(tiny_model, model_cache)
    encode_file(recordings["wav_mono"], tmp_path / "a.ecdc", model=name, device="cpu")
    pipeline._CODECS.clear()
    decode_file(tmp_path / "a.ecdc", tmp_path / "a.wav", device="cpu")  # the model the file names, on the CPU
    assert [key for key in pipeline._CODECS] == [(name, "cpu")]
    if not torch.cuda.is_available():  # asked for a GPU that is not there: an error before anything is written
        with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
            decode_file(tmp_path / "a.ecdc", tmp_path / "b.wav", device="cuda")
        assert not (tmp_path / "b.wav").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_without_a_model(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path,
                                    model_cache: Path) -> None:
    name = copy_package(tiny_model, model_cache)
    encode_file(recordings["wav_mono"], tmp_path / "g.ecdc", model=name, device="cpu")
    pipeline._CODECS.clear()
    result = decode_file(tmp_path / "g.ecdc", tmp_path / "g.wav", device="cuda")
    assert [key for key in pipeline._CODECS] == [(name, "cuda")]
    assert pipeline._CODECS[(name, "cuda")].device.type == "cuda"
    assert sf.info(str(tmp_path / "g.wav")).frames == sf.info(str(recordings["wav_mono"])).frames
    assert result.sample_rate == sf.info(str(recordings["wav_mono"])).samplerate


def test_codec_encode_uses_the_default_bandwidth_of_the_file_path(tiny_model: Path, tmp_path: Path) -> None:
    """`Codec.encode(wav)` with no bandwidth codes the package's default bandwidth, which is also the
    file bitrate `encode_file` and the CLI aim at when the package names no `default_kbps`."""
    from neucodec import load_codec

    meta = json.loads(tiny_model.read_text())
    path = tmp_path / tiny_model.name
    shutil.copy(tiny_model.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
    path.write_text(json.dumps({**meta, "default_bandwidth": 1.5}))
    codec = load_codec(path)
    assert codec.default_bandwidth == pipeline.default_kbps(codec) == 1.5
    wav = torch.randn(1, 1, 4800) * 0.1
    assert codec.encode(wav).codes.shape[1] == codec.n_q_for_bandwidth(1.5) == 2
    assert codec.encode(wav, None).codes.shape[1] == codec.n_q  # None: every codebook
    assert load_codec(tiny_model).default_bandwidth == 6.0  # no package value: 6 kbps, where offered


def test_encoding_into_an_audio_name_is_refused(recordings: dict[str, Path], tiny_model: Path,
                                                tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"named as audio, .* name it .*y\.ecdc$"):
        encode_file(recordings["wav_mono"], tmp_path / "y.wav", model=tiny_model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_encode_decodes_on_cpu(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    encode_file(recordings["wav_mono"], tmp_path / "g.ecdc", model=tiny_model, device="cuda", use_lm=True)
    decode_file(tmp_path / "g.ecdc", tmp_path / "g.wav", model=tiny_model, device="cpu")
    assert sf.info(str(tmp_path / "g.wav")).frames == sf.info(str(recordings["wav_mono"])).frames


def test_unknown_bandwidth_fails_before_writing(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSetting, match=r"bandwidth=0.5 is below .* use bandwidth=1.5 or more"):
        encode_file(recordings["wav_mono"], tmp_path / "a.ecdc", model=tiny_model, bandwidth=0.5)
    assert not (tmp_path / "a.ecdc").exists()
    assert encode_file(recordings["wav_mono"], tmp_path / "a.ecdc", model=tiny_model, bandwidth=5).info.n_q == 4


def test_tiny_signals(tiny_model: Path, tmp_path: Path) -> None:
    """One sample, and a 7-channel file at an odd rate."""
    sf.write(tmp_path / "one.wav", np.array([0.5], np.float32), 8000)
    encode_file(tmp_path / "one.wav", tmp_path / "one.ecdc", model=tiny_model)
    decode_file(tmp_path / "one.ecdc", tmp_path / "one_out.wav", model=tiny_model)
    assert sf.info(str(tmp_path / "one_out.wav")).frames == 1
    sf.write(tmp_path / "seven.wav", np.zeros((1234, 7), np.float32), 11025)
    encode_file(tmp_path / "seven.wav", tmp_path / "seven.ecdc", model=tiny_model)
    decode_file(tmp_path / "seven.ecdc", tmp_path / "seven_out.wav", model=tiny_model)
    info = sf.info(str(tmp_path / "seven_out.wav"))
    assert (info.channels, info.samplerate, info.frames) == (7, 11025, 1234)


def test_a_file_harder_than_the_measured_points_steps_down(tiny_model: Path, tmp_path: Path) -> None:
    """Rate control checks the file it wrote: when the package's points understate a file's rate,
    it encodes the file again a point lower, within the target."""
    from neucodec import load_codec

    codec = load_codec(tiny_model)
    low, high = codec.n_q_for_bandwidth(1.5), codec.n_q_for_bandwidth(6.0)
    meta = json.loads(tiny_model.read_text())
    path = tmp_path / "understated" / tiny_model.name
    path.parent.mkdir()
    shutil.copy(tiny_model.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
    points = [{"codebooks": low, "envelope": None, "lm": False, "kbps": 1.0, "kbps_high": 1.0, "score": 1.0},
              {"codebooks": high, "envelope": None, "lm": False, "kbps": 1.2, "kbps_high": 1.2, "score": 2.0}]
    path.write_text(json.dumps({**meta, "operating_points": points}))
    src = tmp_path / "noise.wav"
    sf.write(src, (np.random.default_rng(0).standard_normal(24000 * 12) * 0.1).astype(np.float32), 24000)
    result = encode_file(src, tmp_path / "a.ecdc", model=path, bandwidth=2.0)
    assert result.point is not None and result.point.codebooks == low  # the first try, 6 kbps of codes, was over
    assert result.kbps <= 1.05 * 2.0 + 0.1 and result.info.n_q == low
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ecdc", "noise.wav", "understated"]
