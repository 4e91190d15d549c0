"""Scores on the dev clips: ViSQOL (shared by the training evaluation and `bin/bench_quality.py`)
and a codec's SI-SNR, mel distance and ViSQOL per category and bandwidth (`dev_scores`).

ViSQOL v3 in speech mode (visqol-python, lattice mapper) at 16 kHz, used for every category: on
music and general sounds it is a rough similarity score, not a music MOS (audio mode is unreliable
on band-limited signals, see ../shared/docs/evaluation.md). visqol-python is optional (the `eval`
extra): `load_visqol()` returns None without it.
"""
from __future__ import annotations

import typing as tp
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from .. import envelope
from ..model import Codec
from .losses import mel_distance, si_snr

VISQOL_RATE = 16000


class VisqolSpeech:
    """ViSQOL speech-mode MOS-LQO of a degraded signal against its reference; create once, reuse.

    Raises ImportError when visqol-python is not installed.
    """

    def __init__(self) -> None:
        from visqol import VisqolApi

        self.api = VisqolApi()
        self.api.create(mode="speech", use_lattice_model=True)

    def __call__(self, ref: np.ndarray, deg: np.ndarray, sample_rate: int) -> float:
        """Score 1-D `deg` against 1-D `ref` (both at `sample_rate`); nan for a silent or unscorable `deg`.

        ViSQOL aligns the signals itself, so `deg` may be delayed or of a different length.
        """
        if sample_rate != VISQOL_RATE:
            ref = soxr.resample(ref, sample_rate, VISQOL_RATE)
            deg = soxr.resample(deg, sample_rate, VISQOL_RATE)
        if not np.any(deg):
            return float("nan")
        # visqol-python's parallel numba loops can reset the OpenMP thread count torch shares with them
        # (measured: 1 -> 2 on this machine once numba was loaded), so the codec after the first score
        # would run on more threads than the caller set. Keep the caller's count.
        threads = torch.get_num_threads()
        try:
            return float(self.api.measure_from_arrays(np.asarray(ref, np.float64), np.asarray(deg, np.float64),
                                                      VISQOL_RATE).moslqo)
        except Exception as e:  # noqa: BLE001 - a failed score is reported as nan, not fatal
            warnings.warn(f"ViSQOL failed: {type(e).__name__}: {e}", stacklevel=2)
            return float("nan")
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def load_visqol() -> VisqolSpeech | None:
    """A `VisqolSpeech`, or None when visqol-python is not installed."""
    try:
        return VisqolSpeech()
    except ImportError:
        return None


@torch.no_grad()
def dev_scores(codec: Codec, clips: tp.Sequence[Path], bandwidths: tp.Sequence[float],
               visqol: VisqolSpeech | None, visqol_for: tp.Callable[[str, int, float], bool]) -> dict[str, float]:
    """Means over `clips` of SI-SNR and mel distance per category (the file name's prefix) and
    bandwidth, keys `{category}_{bandwidth}k_{metric}`, coding with `codec`'s encoder, quantizer and
    decoder (no container, no LM); ViSQOL too where `visqol_for(category, index of the clip within
    its category, bandwidth)` says so and a scorer is given."""
    return {k: float(np.mean(v)) for k, v in dev_scores_per_clip(codec, clips, bandwidths, visqol, visqol_for).items()}


def dev_scores_per_clip(codec: Codec, clips: tp.Sequence[Path], bandwidths: tp.Sequence[float],
                        visqol: VisqolSpeech | None,
                        visqol_for: tp.Callable[[str, int, float], bool],
                        correct: str | None = None) -> dict[str, list[float]]:
    """`dev_scores` before the means: each key's scores in the order of `clips`. With `correct` (an
    envelope table), of the decoded audio with its envelope correction on that table's grid applied
    (`neucodec.envelope`), as a file of one segment carries it, and the correction's rate coded with
    that table (`..._envelope_kbps`)."""
    out: dict[str, list[float]] = {}
    per_category: dict[str, int] = {}
    grid, table = (envelope.table_grid(correct), envelope.table(correct)) if correct is not None else (None, None)
    for path in clips:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        wav = torch.from_numpy(x.mean(1))[None, None].to(codec.device)
        cat = path.stem.split("_")[0]
        index = per_category.get(cat, 0)
        per_category[cat] = index + 1
        z = codec.encoder(wav)
        for bw in bandwidths:
            q = codec.quantizer(z, codec.config.n_q_for_bandwidth(bw))
            y = codec.decoder(q.quantized)[..., : wav.shape[-1]]
            key = f"{cat}_{bw:g}k"
            if grid is not None:
                ref, dec = wav.flatten().double().cpu().numpy(), y.flatten().double().cpu().numpy()
                steps = envelope.measure(ref, dec, grid)
                y = torch.from_numpy(envelope.apply(dec, steps, grid)).to(y).view_as(y)
                coded = envelope.encode_steps(steps[None], table)
                out.setdefault(f"{key}_envelope_kbps", []).append(8 * len(coded) * sr / len(x) / 1000)
            out.setdefault(f"{key}_si_snr", []).append(float(si_snr(y, wav).mean()))
            out.setdefault(f"{key}_mel", []).append(mel_distance(y, wav, codec.sample_rate))
            if visqol is not None and visqol_for(cat, index, bw):
                out.setdefault(f"{key}_visqol", []).append(visqol(
                    wav.flatten().cpu().numpy(), y.flatten().float().cpu().numpy(), codec.sample_rate))
    return out
