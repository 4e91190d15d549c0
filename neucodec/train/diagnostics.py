"""Latent diagnostics: how many dimensions the encoder's latent uses, and which bands survive coding.

Two measurements, shared by the training evaluation (`solver.py`) and `bin/latent_diagnostics.py`:

* `pca_rank`: the number of principal components of the latent frames (mean removed) that hold a
  given fraction of their energy. A latent of D dimensions that carries the sound uses most of
  them; a rank far below D means the decoder is driven by a few directions only.
* `read_rank`: the same, for the latent as the decoder's first convolution reads it: each frame
  measured by that convolution's weights (the norm z' M z, M = sum over taps of W_k' W_k). A change
  of the latent's basis that the decoder undoes (`widen.whiten_latent`) changes `pca_rank`, not this.
* `band_correlation`: the Pearson correlation between the input and the decoded audio within each
  frequency band (brick-wall masks on the whole signal's FFT). Near 1 the output follows the input
  in that band; near 0 it plays something unrelated there (or nothing), whatever its level.
"""
from __future__ import annotations

import typing as tp

import numpy as np
import torch

from ..layers import effective_weight
from ..model import Codec

BANDS_HZ: tuple[tuple[float, float], ...] = (
    (0, 500), (500, 1000), (1000, 1500), (1500, 2000), (2000, 3000), (3000, 4000), (4000, 6000), (6000, 8000))
FRACTIONS = (0.9, 0.99)


def band_name(band: tuple[float, float]) -> str:
    lo, hi = band
    return f"{lo / 1000:g}-{hi / 1000:g}k"


def pca_rank(frames: np.ndarray, fractions: tp.Sequence[float] = FRACTIONS) -> list[int]:
    """Components needed to hold each of `fractions` of the energy of `frames` [N, D] (mean removed)."""
    x = np.asarray(frames, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    energy = np.linalg.svd(x, compute_uv=False) ** 2
    if not energy.sum():
        return [0 for _ in fractions]
    cumulative = np.cumsum(energy) / energy.sum()
    return [int(np.searchsorted(cumulative, f - 1e-12) + 1) for f in fractions]


def read_rank(codec: Codec, frames: np.ndarray, fractions: tp.Sequence[float] = FRACTIONS) -> list[int]:
    """`pca_rank` of latent `frames` [N, D] as `codec`'s decoder reads them (mean removed)."""
    weight = effective_weight(codec.decoder.model[0].conv.conv).detach().double().cpu().numpy()  # [out, D, taps]
    values, vectors = np.linalg.eigh(np.einsum("odk,oek->de", weight, weight))
    root = vectors @ np.diag(np.sqrt(values.clip(min=0))) @ vectors.T
    return pca_rank(np.asarray(frames, dtype=np.float64) @ root, fractions)


def band_correlation(ref: np.ndarray, out: np.ndarray, sample_rate: int,
                     bands: tp.Sequence[tuple[float, float]] = BANDS_HZ) -> list[float]:
    """Correlation of `ref` and `out` (1-D, same length) within each band; NaN where either is silent."""
    n = min(len(ref), len(out))
    spec_ref, spec_out = np.fft.rfft(ref[:n].astype(np.float64)), np.fft.rfft(out[:n].astype(np.float64))
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    result = []
    for lo, hi in bands:
        mask = (freqs >= lo) & (freqs < hi)
        if lo == 0:
            mask &= freqs > 0  # the mean is not a band's content
        a, b = spec_ref[mask], spec_out[mask]
        # Parseval: the band-passed signals' inner products, computed on their spectra
        den = np.sqrt(np.sum(np.abs(a) ** 2) * np.sum(np.abs(b) ** 2))
        result.append(float(np.real(np.sum(a * np.conj(b))) / den) if den > 0 else float("nan"))
    return result


@torch.no_grad()
def latent_report(codec: Codec, clips: tp.Sequence[np.ndarray], n_qs: tp.Sequence[int | None] = (None, 2, 8, 32),
                  bands: tp.Sequence[tuple[float, float]] = BANDS_HZ,
                  fractions: tp.Sequence[float] = FRACTIONS) -> dict[str, float]:
    """Rank of the latent over all `clips` (mono float arrays at the codec's rate) and the mean band
    correlation per number of codebooks (None: the quantizer bypassed; counts above the codec's are
    skipped). Keys: `rank{90,99}`, `read_rank{90,99}`, `corr_{q}_{band}` with q `none` or the count."""
    codec = codec.eval()
    latents, per_q = [], {q: [] for q in n_qs if q is None or q <= codec.n_q}
    for x in clips:
        wav = torch.from_numpy(np.asarray(x, dtype=np.float32))[None, None].to(codec.device)
        z = codec.encoder(wav)
        latents.append(z[0].t().double().cpu().numpy())
        for q in per_q:
            zq = z if q is None else codec.quantizer(z, q).quantized
            y = codec.decoder(zq)[0, 0, : wav.shape[-1]].double().cpu().numpy()
            per_q[q].append(band_correlation(np.asarray(x, dtype=np.float64), y, codec.sample_rate, bands))
    out: dict[str, float] = {}
    frames = np.concatenate(latents)
    for f, r, d in zip(fractions, pca_rank(frames, fractions), read_rank(codec, frames, fractions)):
        out[f"rank{round(f * 100):d}"], out[f"read_rank{round(f * 100):d}"] = float(r), float(d)
    for q, rows in per_q.items():
        means = np.nanmean(np.array(rows), axis=0)
        for band, value in zip(bands, means):
            out[f"corr_{'none' if q is None else q}_{band_name(band)}"] = float(value)
    return out
