"""Envelope correction: exact resynthesis, levels, and a correction that repairs a wrong envelope."""
from __future__ import annotations

import numpy as np
import pytest

from neucodec import envelope

GRID = envelope.Grid()


def _noise(seconds: float, seed: int, rms: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=int(24000 * seconds) + 77) * rms


def _shaped(x: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """x with a gain per STFT bin and frame, [bins, frames], applied through the same STFT."""
    spec = envelope.stft(x, GRID)
    return envelope.istft(spec * 10 ** (gain_db / 20), GRID, len(x))


def test_no_correction_resynthesises_the_input_exactly() -> None:
    x = _noise(1.3, 0)
    zero = np.zeros((GRID.bands, GRID.tiles(len(x))), np.int8)
    assert np.max(np.abs(envelope.apply(x, zero, GRID) - x)) < 1e-12


@pytest.mark.parametrize("rms", [0.3, 0.01])
def test_levels_of_white_noise_follow_its_rms(rms: float) -> None:
    lv = envelope.levels(_noise(2.0, 1, rms), GRID)
    assert lv.shape == (GRID.bands, GRID.tiles(48077))
    assert abs(np.median(lv) - 20 * np.log10(rms)) < 1.0


def test_a_tile_is_three_code_frames_and_bands_reach_8_khz() -> None:
    assert GRID.tile == 3 * 320
    assert GRID.bands * GRID.bins * 24000 / GRID.window == 8000


def test_measure_and_apply_repair_a_moving_envelope() -> None:
    reference = _noise(2.0, 2)
    frames = envelope.stft(reference, GRID).shape[1]
    bins = np.arange(GRID.window // 2 + 1)[:, None]
    t = np.arange(frames)[None, :]
    formant = 60 + 40 * np.sin(2 * np.pi * t / 37)  # a peak wandering between 1 and 5 kHz
    reference = _shaped(reference, 18 * np.exp(-((bins - formant) / 12) ** 2) - 9)
    decoded = _noise(2.0, 3) * 0.25  # another noise, flat and 12 dB low: the right fine structure is not the point
    steps = envelope.measure(reference, decoded, GRID)
    assert steps.dtype == np.int8 and steps.shape == (GRID.bands, GRID.tiles(len(reference)))
    repaired = envelope.apply(decoded, steps, GRID)
    want = envelope.levels(reference, GRID)
    before = np.abs(envelope.levels(decoded, GRID) - want)[:, 1:-1].mean()
    after = np.abs(envelope.levels(repaired, GRID) - want)[:, 1:-1].mean()
    assert before > 5 and after < 0.3 * before


def test_silence_gets_no_correction_and_corrections_are_clipped() -> None:
    silent = np.zeros(24077)
    assert not envelope.measure(silent, _noise(1.0, 4), GRID).any()
    loud = _noise(1.0, 5, rms=0.5)
    steps = envelope.measure(loud, loud * 1e-4, GRID)  # 80 dB missing: more than max_steps * step_db
    assert (steps == GRID.max_steps).all()


def test_shapes_that_do_not_fit_are_refused() -> None:
    x = _noise(1.0, 6)
    with pytest.raises(ValueError, match="does not fit"):
        envelope.apply(x, np.zeros((GRID.bands, 3), np.int8), GRID)
    with pytest.raises(ValueError, match="samples"):
        envelope.measure(x, x[:-1], GRID)


def _table(span: int, seed: int) -> np.ndarray:
    """A table favouring small corrections and repeats of the previous value, as fitted ones do."""
    values = np.arange(-span, span + 1)
    t = np.exp(-np.abs(values[None, :]) / 2 - np.abs(values[None, :] - values[:, None]) / 3)
    t *= 1 + 0.2 * np.random.default_rng(seed).random(t.shape)
    return (t / t.sum(axis=1, keepdims=True)).astype(np.float32)


def test_corrections_round_trip_through_the_range_coder_and_likely_ones_cost_less() -> None:
    table = _table(GRID.max_steps, 0)
    reference, decoded = _noise(3.0, 7), _noise(3.0, 8) * 0.5
    steps = envelope.measure(reference, decoded, GRID)
    payload = envelope.encode_steps(steps, table)
    assert len(payload) % 4 == 0
    assert np.array_equal(envelope.decode_steps(payload, table, *steps.shape), steps)
    wild = np.random.default_rng(9).integers(-GRID.max_steps, GRID.max_steps + 1, steps.shape).astype(np.int8)
    assert np.array_equal(envelope.decode_steps(envelope.encode_steps(wild, table), table, *wild.shape), wild)
    assert len(envelope.encode_steps(wild, table)) > 2 * len(payload)  # steady corrections are cheap


def test_the_coder_refuses_what_it_cannot_code() -> None:
    table = _table(3, 1)
    with pytest.raises(ValueError, match="beyond"):
        envelope.encode_steps(np.full((2, 2), 4, np.int8), table)
    with pytest.raises(ValueError, match="square float32"):
        envelope.encode_steps(np.zeros((2, 2), np.int8), table.astype(np.float64))
    with pytest.raises(ValueError, match="whole 32-bit words"):
        envelope.decode_steps(b"abc", table, 2, 2)


def test_a_table_fitted_on_corrections_counts_what_follows_what_and_codes_them_cheaply() -> None:
    steps = np.array([[1, 1, 2], [0, -1, -1]], np.int8)
    counts = envelope.transition_counts([steps], span=2)
    assert counts.sum() == steps.size
    assert counts[2, 3] == 1 and counts[3, 3] == 1 and counts[3, 4] == 1  # 0 -> 1, 1 -> 1, 1 -> 2
    assert counts[2, 2] == 1 and counts[2, 1] == 1 and counts[1, 1] == 1  # 0 -> 0, 0 -> -1, -1 -> -1
    table = envelope.transition_table([steps], span=2)
    assert np.allclose(table.sum(axis=1), 1) and (table > 0).all()
    reference, decoded = _noise(3.0, 10), _noise(3.0, 11) * 0.5
    real = envelope.measure(reference, decoded, GRID)
    fitted = envelope.transition_table([real], GRID.max_steps).astype(np.float32)
    uniform = np.full_like(fitted, 1 / len(fitted))
    assert len(envelope.encode_steps(real, fitted)) < 0.5 * len(envelope.encode_steps(real, uniform))
