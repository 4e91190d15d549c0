"""Pure helpers of bin/bench_quality.py: alignment, SI-SNR, bitrate maths, Ogg packet sizes, ecdc payload,
Opus-equivalent rates."""
from __future__ import annotations

import importlib.util
import io
import math
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bq() -> types.ModuleType:
    """The script as a module (its optional metric packages are imported lazily, so none are needed)."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bin" / "bench_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


def test_kbps(bq: types.ModuleType) -> None:
    assert bq.kbps(7500, 10.0) == pytest.approx(6.0)
    assert bq.kbps(0, 1.0) == 0.0
    assert bq.kbps(1500, 1.0) == pytest.approx(12.0)


@pytest.mark.parametrize("delay", [0, 37, -25, 480])
def test_waveform_alignment_recovers_delay(bq: types.ModuleType, delay: int) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(12000).astype(np.float32)
    deg = np.zeros_like(ref)
    if delay >= 0:
        deg[delay:] = ref[: len(ref) - delay]
    else:
        deg[:delay] = ref[-delay:]
    deg = deg + 0.05 * rng.standard_normal(len(ref)).astype(np.float32)
    found, how = bq.estimate_delay(ref, deg, max_lag=1200)
    assert (found, how) == (delay, "waveform")
    aligned, d, _ = bq.align(ref, deg, max_lag=1200)
    assert d == delay and len(aligned) == len(ref)
    inner = slice(abs(delay), len(ref) - abs(delay))
    assert np.corrcoef(aligned[inner], ref[inner])[0, 1] > 0.99


def test_alignment_is_polarity_blind(bq: types.ModuleType) -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(6000)
    deg = -np.concatenate([np.zeros(10), ref[:-10]])
    assert bq.estimate_delay(ref, deg, max_lag=100) == (10, "waveform")


def test_envelope_fallback_for_phase_free_codecs(bq: types.ModuleType) -> None:
    """Independent noise with the same bursty envelope: no waveform match, the envelope finds the lag."""
    rng = np.random.default_rng(2)
    n, sr = 24000, 24000
    env = np.zeros(n)
    for start in (2000, 9000, 15000):
        env[start: start + 2400] = 1.0
    ref = env * rng.standard_normal(n)
    deg_env = np.concatenate([np.zeros(450), env[:-450]])
    deg = deg_env * rng.standard_normal(n)
    found, how = bq.estimate_delay(ref, deg, max_lag=int(0.1 * sr))
    assert how == "envelope"
    assert abs(found - 450) <= 5


def test_silent_signal(bq: types.ModuleType) -> None:
    ref = np.random.default_rng(3).standard_normal(1000)
    assert bq.estimate_delay(ref, np.zeros(1000), 100) == (0, "silent")


def test_shift(bq: types.ModuleType) -> None:
    x = np.arange(1, 7, dtype=np.float32)  # 1..6
    np.testing.assert_array_equal(bq.shift(x, 2, 6), [3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(bq.shift(x, -2, 6), [0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(bq.shift(x, 0, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(bq.shift(x, 1, 8), [2, 3, 4, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(bq.shift(x, 10, 3), [0, 0, 0])


def test_si_snr(bq: types.ModuleType) -> None:
    rng = np.random.default_rng(4)
    ref = rng.standard_normal(8000)
    assert bq.si_snr(0.3 * ref, ref) > 60  # scale-invariant
    noise = rng.standard_normal(8000)
    noise -= (noise @ ref) / (ref @ ref) * ref  # orthogonal, so the SNR is exact
    noise *= np.linalg.norm(ref) / np.linalg.norm(noise) / 10  # 20 dB
    assert bq.si_snr(ref + noise, ref) == pytest.approx(20.0, abs=0.05)


def _ogg_page(serial: int, seq: int, lacing: list[int], flags: int = 0) -> bytes:
    head = b"OggS" + bytes([0, flags]) + struct.pack("<qIII", 0, serial, seq, 0) + bytes([len(lacing)])
    return head + bytes(lacing) + b"\x00" * sum(lacing)


def test_ogg_packet_sizes(bq: types.ModuleType) -> None:
    data = (_ogg_page(7, 0, [19], flags=2)  # OpusHead
            + _ogg_page(7, 1, [60])  # OpusTags
            + _ogg_page(9, 0, [33])  # another logical stream: ignored
            + _ogg_page(7, 2, [45, 45, 255, 255])  # two packets, then one continuing on the next page
            + _ogg_page(7, 3, [10, 3], flags=1))
    assert bq.ogg_packet_sizes(data) == [19, 60, 45, 45, 520, 3]
    with pytest.raises(ValueError):
        bq.ogg_packet_sizes(b"RIFF" + b"\x00" * 40)


def test_ecdc_payload_bytes_is_the_packed_codes(bq: types.ModuleType, tiny_model: Path, one_thread: None) -> None:
    from neucodec import ecdc, load_codec

    codec = load_codec(tiny_model)
    wav = 0.1 * torch.randn(1, 1, codec.sample_rate)  # 1 s
    data = ecdc.encode_bytes(codec, wav, 3.0)
    payload = bq.ecdc_payload_bytes(data)
    info = ecdc.read_info(io.BytesIO(data))
    bits = info.frames * info.n_q * info.bits_per_code
    assert bits / 8 <= payload < bits / 8 + 8 * info.segments  # whole bytes per segment
    assert payload < len(data)


def test_nanmean(bq: types.ModuleType) -> None:
    assert bq.nanmean([1.0, float("nan"), 3.0]) == 2.0
    assert np.isnan(bq.nanmean([float("nan")]))


OPUS_RATES = [2.5, 4.0, 7.0, 13.0]  # file kbps of Opus at 1.5, 3, 6, 12 (1.5 decodes to silence)
OPUS_VISQOL = [float("nan"), 1.5, 1.4, 3.5]  # not monotone: 7 kbps scores below 4 kbps


def test_opus_equivalent_rate_interpolates_the_monotone_curve(bq: types.ModuleType) -> None:
    assert bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, 2.5) == pytest.approx((10.0, 10.0))
    # 7 kbps reaches only the 1.5 of 4 kbps (running best): 1.5 -> 3.5 between 7 and 13 kbps
    assert bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, 1.6) == pytest.approx((7.3, 7.3))
    assert bq.opus_equivalent_rate(OPUS_RATES[::-1], OPUS_VISQOL[::-1], 2.5) == pytest.approx((10.0, 10.0))
    assert bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, 3.5) == (13.0, 13.0)


def test_opus_equivalent_rate_bounds(bq: types.ModuleType) -> None:
    assert bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, 3.6) == (13.0, math.inf)  # beyond Opus's best
    assert bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, 1.2) == (2.5, 4.0)  # after the silent rate
    assert bq.opus_equivalent_rate(OPUS_RATES[1:], OPUS_VISQOL[1:], 1.2) == (0.0, 4.0)  # below the lowest
    assert all(math.isnan(v) for v in bq.opus_equivalent_rate(OPUS_RATES, OPUS_VISQOL, float("nan")))
    assert all(math.isnan(v) for v in bq.opus_equivalent_rate([], [], 1.0))


def test_opus_equivalent_rate_lower_is_better(bq: types.ModuleType) -> None:
    mel = [2.2, 0.8, 0.6, 0.3]
    assert bq.opus_equivalent_rate(OPUS_RATES, mel, 0.45, higher_is_better=False) == pytest.approx((10.0, 10.0))
    assert bq.opus_equivalent_rate(OPUS_RATES, mel, 1.5, higher_is_better=False) == pytest.approx((3.25, 3.25))
    assert bq.opus_equivalent_rate(OPUS_RATES, mel, 0.2, higher_is_better=False) == (13.0, math.inf)
    assert bq.opus_equivalent_rate(OPUS_RATES, mel, 2.5, higher_is_better=False) == (0.0, 2.5)


def test_ratio_text_and_bar(bq: types.ModuleType) -> None:
    assert bq.ratio_text(1.344, 1.344) == "1.34"
    assert bq.ratio_text(2.1, math.inf) == "> 2.10"
    assert bq.ratio_text(0.0, 0.61) == "< 0.61"
    assert bq.ratio_text(1.52, 2.43) == "1.52–2.43"
    assert bq.ratio_text(math.nan, math.nan) == "—"
    assert bq.meets(1.3, 1.3, 1.3) is True
    assert bq.meets(2.1, math.inf, 1.0) is True
    assert bq.meets(0.0, 0.61, 1.0) is False
    assert bq.meets(0.0, 2.4, 1.0) is None  # Opus's lowest rate already scores better: undecided
    assert bq.meets(0.9, 0.9, 1.0) is False
    assert bq.meets(math.nan, math.nan, 1.0) is None
