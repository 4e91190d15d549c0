"""Shared fixtures: offline weights cache, tiny release packages (mono causal, stereo segmented), recordings."""
from __future__ import annotations

import shutil
import subprocess
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from neucodec.config import CodecConfig, LMConfig, RVQConfig, SEANetConfig
from neucodec.lm import LanguageModel
from neucodec.model import Codec
from neucodec.weights import save_release

TINY_SEANET = dict(n_filters=4, dimension=16, lstm=1)
TINY_RVQ = RVQConfig(dimension=16, n_q=8, bins=1024, kmeans_init=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches the network or the user's cache."""
    monkeypatch.setenv("NEUCODEC_OFFLINE", "1")
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> tp.Iterator[None]:
    """One torch thread here and in subprocesses: on a shared, busy machine OpenMP threads spin against
    each other (measured 60x slower). Not global: decoded-audio golden digests depend on the thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_package(package: Path, folder: Path) -> str:
    """Copy a release package (its .json and .safetensors) into `folder`; its name."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(package.with_suffix(suffix), folder / package.with_suffix(suffix).name)
    return package.stem


@pytest.fixture
def model_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh $NEUCODEC_CACHE to install packages in (`copy_package`), so that files name them and
    decode without `model`; the models loaded by name stay this test's."""
    from neucodec import pipeline

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("NEUCODEC_CACHE", str(cache))
    monkeypatch.setattr(pipeline, "_CODECS", {})
    monkeypatch.setattr(pipeline, "_LMS", {})
    return cache


def _export(folder: Path, name: str, config: CodecConfig, with_lm: bool, envelope: str | None = None) -> Path:
    torch.manual_seed(0)
    codec = Codec(config)
    lm = lm_config = None
    if with_lm:
        lm_config = LMConfig(n_q=8, dim=32, num_layers=2, num_heads=2, past_context=50)
        lm = LanguageModel(lm_config)
    return save_release(folder / f"{name}.json", name, codec, config, lm, lm_config, envelope=envelope)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal 24 kHz mono release package with an LM (random weights) that opts in to the envelope
    correction, as the default model does."""
    config = CodecConfig(name="tiny_24khz", seanet=SEANetConfig(**TINY_SEANET), quantizer=TINY_RVQ,
                         bandwidths=(1.5, 3.0, 6.0))
    return _export(tmp_path_factory.mktemp("models"), "tiny_24khz", config, with_lm=True, envelope="e1")


@pytest.fixture(scope="session")
def tiny_stereo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-causal 48 kHz stereo model with 1 s normalised segments, no LM."""
    config = CodecConfig(name="tiny_48khz", sample_rate=48000, channels=2,
                         seanet=SEANetConfig(channels=2, causal=False, norm="time_group_norm", **TINY_SEANET),
                         quantizer=TINY_RVQ, bandwidths=(3.0, 6.0), segment=1.0, normalize=True)
    return _export(tmp_path_factory.mktemp("models"), "tiny_48khz", config, with_lm=False)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real speech recording (espeak-ng when present, else a synthetic vowel-like signal), 22.05 kHz mono."""
    folder = tmp_path_factory.mktemp("audio")
    path = folder / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "Neural codecs compress speech."], check=True,
                       capture_output=True)
    else:
        sr = 22050
        t = np.arange(int(1.5 * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        sf.write(path, x.astype(np.float32), sr)
    return path


@pytest.fixture(scope="session")
def recordings(speech: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The speech recording in several formats, rates and channel counts."""
    folder = tmp_path_factory.mktemp("formats")
    x, sr = sf.read(speech, dtype="float32")
    stereo = np.stack([x, 0.5 * x], axis=1)
    out = {"wav_mono": speech}
    sf.write(folder / "stereo_44k.flac", _rs(stereo, sr, 44100), 44100)
    out["flac_stereo"] = folder / "stereo_44k.flac"
    sf.write(folder / "mono.ogg", x, sr, format="OGG", subtype="VORBIS")
    out["ogg"] = folder / "mono.ogg"
    sf.write(folder / "mono.mp3", x, sr, format="MP3")
    out["mp3"] = folder / "mono.mp3"
    sf.write(folder / "stereo_48k.wav", _rs(stereo, sr, 48000), 48000, subtype="PCM_24")
    out["wav_stereo"] = folder / "stereo_48k.wav"
    return out


def _rs(x: np.ndarray, sr: int, new: int) -> np.ndarray:
    import soxr

    return soxr.resample(x, sr, new)
