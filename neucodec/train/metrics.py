"""ViSQOL scoring shared by the training evaluation (`solver.py`) and `bin/bench_quality.py`.

ViSQOL v3 in speech mode (visqol-python, lattice mapper) at 16 kHz, used for every category: on
music and general sounds it is a rough similarity score, not a music MOS (audio mode is unreliable
on band-limited signals, see ../shared/docs/evaluation.md). visqol-python is optional (the `eval`
extra): `load_visqol()` returns None without it.
"""
from __future__ import annotations

import warnings

import numpy as np
import soxr
import torch

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
