#!/usr/bin/env python3
"""What limits the model's ViSQOL: score the decoded dev speech against oracle repairs of it.

Each row is the mean ViSQOL (speech mode, 16 kHz) over the dev speech clips of one signal:

* the model at a bandwidth, and its encoder -> decoder with no quantizer at all (the latent as is);
* the model's output with its short-time spectral envelope replaced by the reference's
  ("oracle envelope"): the STFT (512-point Hann, hop 256) is rescaled so that its power, smoothed
  over F bins x T frames, matches the reference's smoothed the same way; the fine structure and
  phase stay the model's. F x T = 8 x 4 is about 375 Hz x 43 ms at 24 kHz;
* the same with one static gain per frequency band over the whole clip ("static EQ");
* the reference itself with its spectrum above 1 kHz lowered by 10 and 18 dB, low-passed at 4 kHz,
  or with white noise at 20 dB SNR: what those degradations alone cost.

Then which of ViSQOL's features limit the model's score: its lattice mapper turns four features
of each of 21 bands (mean NSIM, its quantile, its standard deviation, the degraded level) into
the score; each row re-maps the model's features with one part taken from the reference scored
against itself (NSIM 1, spread 0, the reference's levels), for all bands, below or from band 8
(about 1 kHz).

    python bin/probe_visqol.py [--model neucodec_24khz] [--bandwidth 6]     # needs the eval extra
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.signal as ss
import soundfile as sf
import torch
from scipy.ndimage import uniform_filter

from neucodec import load_codec
from neucodec.train.metrics import VisqolSpeech

N_FFT = 512


def stft(x: np.ndarray) -> np.ndarray:
    return ss.stft(x, nperseg=N_FFT)[2]


def istft(z: np.ndarray, n: int) -> np.ndarray:
    return ss.istft(z, nperseg=N_FFT)[1][:n]


def oracle_envelope(x: np.ndarray, y: np.ndarray, bins: int, frames: int) -> np.ndarray:
    """y with the power of its STFT, smoothed over bins x frames, set to x's smoothed the same way."""
    X, Y = stft(x), stft(y)
    n = min(X.shape[1], Y.shape[1])
    X, Y = X[:, :n], Y[:, :n]
    px = uniform_filter(np.abs(X) ** 2, (bins, frames))
    py = uniform_filter(np.abs(Y) ** 2, (bins, frames))
    return istft(Y * np.sqrt((px + 1e-12) / (py + 1e-12)), len(x))


def shelf(x: np.ndarray, db: float, above: float, rate: int = 24000) -> np.ndarray:
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(len(x), 1 / rate) > above] *= 10 ** (db / 20)
    return np.fft.irfft(spec, len(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="neucodec_24khz")
    p.add_argument("--bandwidth", type=float, default=6.0)
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/neucodec-train/corpus/dev/clips")
    args = p.parse_args()
    torch.set_num_threads(1)
    clips = sorted(args.clips.glob("speech_*.wav"))
    if not clips:
        raise SystemExit(f"no dev speech clips in {args.clips}; run bin/build_corpus.py first")
    codec, visqol = load_codec(args.model).eval(), VisqolSpeech()
    n_q = codec.config.n_q_for_bandwidth(args.bandwidth)
    rows: dict[str, list[float]] = {}
    outputs: list[tuple[np.ndarray, np.ndarray]] = []  # (reference, model output) per clip
    rng = np.random.default_rng(0)
    for path in clips:
        x = sf.read(str(path), dtype="float32")[0]
        with torch.no_grad():
            z = codec.encoder(torch.from_numpy(x)[None, None])
            y = codec.decoder(codec.quantizer(z, n_q).quantized)[0, 0, : len(x)].numpy().astype(np.float64)
            free = codec.decoder(z)[0, 0, : len(x)].numpy().astype(np.float64)
        x64 = x.astype(np.float64)
        outputs.append((x64, y))
        signals = {
            f"model at {args.bandwidth:g} kbps": y,
            "model, no quantizer": free,
            "model + oracle envelope 8 x 4": oracle_envelope(x64, y, 8, 4),
            "model + oracle envelope 16 x 8": oracle_envelope(x64, y, 16, 8),
            "model + oracle envelope 32 x 16": oracle_envelope(x64, y, 32, 16),
            "model + oracle static EQ (16-bin bands)": oracle_envelope(x64, y, 16, 1 << 20),
            "reference, -10 dB above 1 kHz": shelf(x64, -10, 1000),
            "reference, -18 dB above 1 kHz": shelf(x64, -18, 1000),
            "reference, low-passed at 4 kHz": shelf(x64, -200, 4000),
            "reference + white noise, 20 dB SNR": x64 + rng.normal(size=len(x)) * x64.std() * 0.1,
        }
        for name, signal in signals.items():
            rows.setdefault(name, []).append(visqol(x64, signal, codec.sample_rate))
    print(f"ViSQOL (speech mode), mean over {len(clips)} dev speech clips; model {args.model}\n")
    print("| signal | ViSQOL |\n|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | {np.nanmean(scores):.2f} |")
    features(visqol, outputs, codec.sample_rate)


def features(visqol: VisqolSpeech, outputs: list[tuple[np.ndarray, np.ndarray]], rate: int) -> None:
    """The lattice mapper's features for the model's outputs, and the score with parts of them repaired."""
    mapper = visqol.api._manager.quality_mapper  # visqol-python internals: the lattice mapper
    seen: list[tuple[np.ndarray, ...]] = []
    predict = mapper.predict_quality

    def record(*f: np.ndarray) -> float:
        seen.append(tuple(np.asarray(v, np.float64) for v in f))
        return predict(*f)

    mapper.predict_quality = record
    parts = ("mean NSIM", "NSIM quantile", "NSIM spread", "level")
    rows: dict[str, list[float]] = {}
    model_f, ref_f = [], []
    try:
        for x, y in outputs:
            visqol(x, y, rate)
            visqol(x, x, rate)
            (m, r), seen[:] = seen[-2:], []
            model_f.append(np.stack(m))  # [feature, band]
            ref_f.append(np.stack(r))
            feature, band = np.arange(4)[:, None], np.arange(len(m[0]))[None, :]
            cases = {"the model's features": np.zeros(model_f[-1].shape, bool)}
            for i, name in enumerate(parts):
                cases[f"{name} from the reference"] = feature == i  # (np.where broadcasts it over the bands)
            cases["all but level, bands 0-7"] = (feature < 3) & (band < 8)
            cases["all but level, bands 8-20"] = (feature < 3) & (band >= 8)
            for name, take in cases.items():
                mixed = np.where(take, ref_f[-1], model_f[-1])
                rows.setdefault(name, []).append(predict(*mixed))
    finally:
        mapper.predict_quality = predict
    print("\n| lattice features | ViSQOL |\n|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | {np.nanmean(scores):.2f} |")
    np.set_printoptions(precision=2, suppress=True, linewidth=200)
    for i, name in enumerate(parts):
        print(f"{name:>14}, model:     {np.mean(model_f, 0)[i]}")
    print(f"{'level':>14}, reference: {np.mean(ref_f, 0)[3]}")


if __name__ == "__main__":
    main()
