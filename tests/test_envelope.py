"""Envelope correction: exact resynthesis, levels, a correction that repairs a wrong envelope, its coding,
its streaming application, and its place in .ecdc files (format version 2)."""
from __future__ import annotations

import hashlib
import io

import constriction
import numpy as np
import pytest
import torch

from _bitstream import skewed_lm, tiny_codec24
from neucodec import container, ecdc, envelope, streamspec
from neucodec.errors import CorruptStream, UnsupportedAudio, UnsupportedFormatVersion

GRID = envelope.Grid()


def _noise(seconds: float, seed: int, rms: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=int(24000 * seconds) + 77) * rms


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """The inverse of `envelope.stft`, written plainly (overlap-add of windowed frames): the oracle
    the streaming `Corrector` (and `apply`, which runs it) is held against."""
    window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(GRID.window) / GRID.window))
    frames = np.fft.irfft(spec.T, GRID.window, axis=1) * window
    out = np.zeros((spec.shape[1] + 1) * GRID.hop)
    for k, frame in enumerate(frames):  # frame k covers samples (k - 1) * hop .. (k + 1) * hop, with padding
        out[k * GRID.hop: k * GRID.hop + GRID.window] += frame
    return out[GRID.hop: GRID.hop + length]


def _shaped(x: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """x with a gain per STFT bin and frame, [bins, frames], applied through the same STFT."""
    return _istft(envelope.stft(x, GRID) * 10 ** (gain_db / 20), len(x))


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


WIDER = envelope.Grid(bands=60, bins=2, wider=((80, 4),))  # e4's grid: 100 Hz bands to 4 kHz, then 200 Hz


def test_wider_bands_higher_up_reach_8_khz_and_measure_like_uniform_ones() -> None:
    assert list(WIDER.edges[:3]) == [0, 2, 4] and list(WIDER.edges[39:43]) == [78, 80, 84, 88]
    assert WIDER.top == 160 == envelope.Grid(bins=2, bands=80).top
    x = _noise(1.3, 7, rms=0.3)
    assert np.max(np.abs(envelope.apply(x, np.zeros((60, WIDER.tiles(len(x))), np.int8), WIDER) - x)) < 1e-12
    lv = envelope.levels(x, WIDER)
    assert lv.shape == (60, WIDER.tiles(len(x))) and abs(np.median(lv) - 20 * np.log10(0.3)) < 1.0
    uniform, as_wider = envelope.Grid(bins=4, bands=40), envelope.Grid(bins=2, bands=40, wider=((0, 4),))
    np.testing.assert_allclose(envelope.levels(x, as_wider), envelope.levels(x, uniform), atol=1e-9)
    steps = np.random.default_rng(8).integers(-3, 4, (40, uniform.tiles(len(x)))).astype(np.int8)
    np.testing.assert_allclose(envelope.apply(x, steps, as_wider), envelope.apply(x, steps, uniform), atol=1e-12)


@pytest.mark.parametrize("grid", [GRID, WIDER], ids=["uniform", "wider"])
def test_measure_and_apply_repair_a_moving_envelope_on_any_grid(grid: envelope.Grid) -> None:
    reference = _noise(2.0, 9)
    bins = np.arange(GRID.window // 2 + 1)[:, None]
    t = np.arange(envelope.stft(reference, GRID).shape[1])[None, :]
    formant = 60 + 40 * np.sin(2 * np.pi * t / 37)  # a peak wandering between 1 and 5 kHz
    reference = _shaped(reference, 18 * np.exp(-((bins - formant) / 12) ** 2) - 9)
    decoded = _noise(2.0, 10) * 0.25  # another noise, flat and 12 dB low: the right fine structure is not the point
    steps = envelope.measure(reference, decoded, grid)
    assert steps.dtype == np.int8 and steps.shape == (grid.bands, grid.tiles(len(reference)))
    repaired = envelope.apply(decoded, steps, grid)
    want = envelope.levels(reference, grid)
    before = np.abs(envelope.levels(decoded, grid) - want)[:, 1:-1].mean()
    assert before > 5 and np.abs(envelope.levels(repaired, grid) - want)[:, 1:-1].mean() < 0.3 * before


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
    """A table favouring small corrections and the values of the neighbours, as fitted ones do:
    [before, below, value]."""
    v = np.arange(-span, span + 1)
    t = np.exp(-np.abs(v)[None, None, :] / 2 - np.abs(v[None, None, :] - v[:, None, None]) / 3
               - np.abs(v[None, None, :] - v[None, :, None]) / 4)
    t *= 1 + 0.2 * np.random.default_rng(seed).random(t.shape)
    return (t / t.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_corrections_round_trip_through_the_range_coder_and_likely_ones_cost_less() -> None:
    table = _table(GRID.max_steps, 0)
    reference, decoded = _noise(3.0, 7), _noise(3.0, 8) * 0.5
    steps = np.stack([envelope.measure(reference, decoded, GRID), envelope.measure(decoded, reference, GRID)])
    payload = envelope.encode_steps(steps, table)  # two rows (channels), coded together
    assert len(payload) % 4 == 0
    assert np.array_equal(envelope.decode_steps(payload, table, *steps.shape), steps)
    wild = np.random.default_rng(9).integers(-GRID.max_steps, GRID.max_steps + 1, steps.shape).astype(np.int8)
    assert np.array_equal(envelope.decode_steps(envelope.encode_steps(wild, table), table, *wild.shape), wild)
    assert len(envelope.encode_steps(wild, table)) > 2 * len(payload)  # steady corrections are cheap


def test_the_coded_order_is_tile_band_row_with_each_values_context() -> None:
    """The bitstream (FORMAT.md 4.5), against a coder that takes the values one at a time."""
    table = _table(GRID.max_steps, 2)
    steps = np.random.default_rng(3).integers(-3, 4, (2, 5, 7)).astype(np.int8)
    span, (rows, bands, tiles) = GRID.max_steps, steps.shape
    padded = np.pad(steps.astype(np.int64) + span, [(0, 0), (1, 0), (1, 0)], constant_values=span)
    coder, family = constriction.stream.queue.RangeEncoder(), constriction.stream.model.Categorical(perfect=False)
    for t in range(tiles):
        for b in range(bands):
            for r in range(rows):
                before, below = padded[r, b + 1, t], padded[r, b, t + 1]
                coder.encode(padded[r, b + 1, t + 1:t + 2].astype(np.int32), family, table[before, below][None].copy())
    assert envelope.encode_steps(steps, table) == coder.get_compressed().astype("<u4").tobytes()


def test_the_coder_refuses_what_it_cannot_code() -> None:
    table = _table(3, 1)
    with pytest.raises(ValueError, match="beyond"):
        envelope.encode_steps(np.full((1, 2, 2), 4, np.int8), table)
    with pytest.raises(ValueError, match="cubic float32"):
        envelope.encode_steps(np.zeros((1, 2, 2), np.int8), table.astype(np.float64))
    with pytest.raises(ValueError, match="whole 32-bit words"):
        envelope.decode_steps(b"abc", table, 1, 2, 2)


def test_a_table_fitted_on_corrections_counts_values_in_their_context_and_codes_them_cheaply() -> None:
    steps = np.array([[1, 1, 2], [0, -1, -1]], np.int8)  # bands 0 and 1, three tiles
    counts = envelope.transition_counts([steps], span=2)
    assert counts.sum() == steps.size
    # [before, below, value] + 2: band 0 (nothing below): 0 -> 1, 1 -> 1, 1 -> 2
    assert counts[2, 2, 3] == 1 and counts[3, 2, 3] == 1 and counts[3, 2, 4] == 1
    # band 1, below it band 0's values 1, 1, 2: 0 -> 0, 0 -> -1, -1 -> -1
    assert counts[2, 3, 2] == 1 and counts[2, 3, 1] == 1 and counts[1, 4, 1] == 1
    table = envelope.transition_table([steps], span=2)
    assert np.allclose(table.sum(axis=-1), 1) and (table > 0).all()
    reference, decoded = _noise(3.0, 10), _noise(3.0, 11) * 0.5
    real = envelope.measure(reference, decoded, GRID)[None]
    fitted = envelope.transition_table([real], GRID.max_steps).astype(np.float32)
    uniform = np.full_like(fitted, 1 / len(fitted))
    assert len(envelope.encode_steps(real, fitted)) < 0.5 * len(envelope.encode_steps(real, uniform))


# ---------------------------------------------------------------- streaming, and in .ecdc files
def test_the_streaming_corrector_is_apply_whatever_the_chunks() -> None:
    x = _noise(2.5, 12)
    steps = np.random.default_rng(13).integers(-3, 4, (GRID.bands, GRID.tiles(len(x)))).astype(np.int8)
    corrector = envelope.Corrector(GRID, 1)
    corrector.add(steps[None])
    cuts = np.cumsum([0, 1, 239, 241, 5000, 17, 30000])
    parts = [corrector.push(x[None, a:b]) for a, b in zip(cuts, [*cuts[1:], len(x)])] + [corrector.finish()]
    assert np.abs(np.concatenate(parts, axis=1)[0] - envelope.apply(x, steps, GRID)).max() < 1e-12
    spec = envelope.stft(x, GRID)  # and `apply` is the plain STFT, gains, inverse STFT
    want = _istft(spec * 10 ** (envelope.gains_db(steps, GRID, spec.shape[1]) / 20), len(x))
    assert np.abs(envelope.apply(x, steps, GRID) - want).max() < 1e-12


def test_segments_are_corrected_each_with_its_own_tiles() -> None:
    x = _noise(2.0, 14)  # 2 s + 77 samples: a segment of 25 tiles (1 s at 24 kHz), then 26 tiles
    steps = np.repeat(np.random.default_rng(15).integers(-3, 4, (1, GRID.bands, 51)).astype(np.int8), 2, axis=0)
    corrector = envelope.Corrector(GRID, 2)
    corrector.add(steps[:, :, :25])
    out = [corrector.push(np.stack([x, -x])[:, :30000])]
    corrector.add(steps[:, :, 25:])
    y = np.concatenate([*out, corrector.push(np.stack([x, -x])[:, 30000:]), corrector.finish()], axis=1)
    spec = envelope.stft(x, GRID)
    first = envelope.gains_db(steps[0, :, :25], GRID, 100)  # each segment's gains alone, then the last held
    second = envelope.gains_db(steps[0, :, 25:], GRID, spec.shape[1] - 100)
    want = _istft(spec * 10 ** (np.concatenate([first, second], axis=1) / 20), len(x))
    assert np.abs(y[0] - want).max() < 1e-12 and np.abs(y[1] + want).max() < 1e-12


@pytest.mark.parametrize("name, grid, digest", [("e1", envelope.Grid(bins=8, bands=20), "b789438815a9d235"),
                                                ("e2", envelope.Grid(bins=4, bands=40), "270f7fa8b70db662"),
                                                ("e3", envelope.Grid(bins=2, bands=80), "ee327fa805e68950"),
                                                ("e4", WIDER, "a939ce8a5c79f08e")])
def test_the_tables_are_fixed_by_the_format(name: str, grid: envelope.Grid, digest: str) -> None:
    t = envelope.table(name)  # FORMAT.md §4.5: never change one
    assert t.dtype == np.float32 and t.shape == (15, 15, 15) and (t > 0).all()
    assert hashlib.sha256(t.tobytes()).hexdigest()[:16] == digest
    assert envelope.table_grid(name) == grid  # a table brings its grid


def _speechlike(seconds: float, groups: int = 1) -> torch.Tensor:
    """Noise with a moving, syllable-rate envelope: the decoded audio of a tiny model misses it."""
    t = torch.arange(int(24000 * seconds)) / 24000
    g = torch.Generator().manual_seed(16)
    x = torch.randn(groups, 1, t.numel(), generator=g) * (0.02 + 0.2 * torch.sin(2 * torch.pi * 3 * t) ** 2)
    return x


@pytest.mark.parametrize("use_lm", [False, True])
def test_a_file_with_corrections_decodes_closer_to_its_input(use_lm: bool) -> None:
    codec = tiny_codec24()
    lm = skewed_lm(n_q=4) if use_lm else None
    wav = _speechlike(2.3, groups=2)
    plain = ecdc.encode_bytes(codec, wav, 3.0, lm, segment_seconds=1.0)
    data = ecdc.encode_bytes(codec, wav, 3.0, lm, segment_seconds=1.0, correct_envelope=True)
    info, corrected = ecdc.decode_bytes(data, codec, lm)
    plain_info, uncorrected = ecdc.decode_bytes(plain, codec, lm)
    assert (plain_info.format_version, plain_info.envelope) == (1, None)
    assert info.format_version == 2 and info.envelope is not None
    assert info.envelope.to_header() == {"table": "e1", "hop": 240, "bins": 8, "hops": 4, "bands": 20, "step_db": 6.0}
    assert info.segment_frames == 75 and info.segments == 3 and info.length == wav.shape[-1]
    assert corrected.shape == uncorrected.shape == wav.shape and len(data) > len(plain)
    assert ecdc.read_info(io.BytesIO(data)).envelope_bytes == info.envelope_bytes > 0 == plain_info.envelope_bytes
    for g in range(2):
        want = envelope.levels(wav[g, 0].double().numpy(), GRID)
        err = [np.abs(envelope.levels(y[g, 0].double().numpy(), GRID) - want)[:, :-1].mean()
               for y in (uncorrected, corrected)]
        assert err[1] < 0.5 * err[0], err


def test_a_file_on_a_grid_of_wider_bands_carries_it_and_decodes_closer_to_its_input() -> None:
    codec = tiny_codec24()
    wav = _speechlike(2.3)
    info, corrected = ecdc.decode_bytes(ecdc.encode_bytes(codec, wav, 3.0, segment_seconds=1.0,
                                                          correct_envelope="e4"), codec)
    assert info.envelope is not None and info.envelope.to_header() == {
        "table": "e4", "hop": 240, "bins": 2, "hops": 4, "bands": 60, "step_db": 6.0, "wider": [[80, 4]]}
    _, uncorrected = ecdc.decode_bytes(ecdc.encode_bytes(codec, wav, 3.0, segment_seconds=1.0), codec)
    want = envelope.levels(wav[0, 0].double().numpy(), WIDER)
    err = [np.abs(envelope.levels(y[0, 0].double().numpy(), WIDER) - want)[:, :-1].mean()
           for y in (uncorrected, corrected)]
    assert err[1] < 0.5 * err[0], err


def test_envelope_damage_and_unknown_tables_are_reported() -> None:
    codec = tiny_codec24()
    data = ecdc.encode_bytes(codec, _speechlike(1.0), 3.0, segment_seconds=0.5, correct_envelope=True)
    prelude = container.read_prelude(io.BytesIO(data))
    header = dict(prelude.header, envelope=dict(prelude.header["envelope"], table="e9"))
    body = data[prelude.size:]
    for changed, error, match in ((header, UnsupportedFormatVersion, "unknown envelope table 'e9'; upgrade"),
                                  (dict(header, envelope=dict(prelude.header["envelope"], hops=5)),
                                   CorruptStream, "envelope tiles do not fit"),
                                  (dict(header, envelope=dict(prelude.header["envelope"], wider=[[80, True]])),
                                   CorruptStream, "envelope field 'wider' has a bad value"),
                                  (dict(header, envelope=dict(prelude.header["envelope"], wider=[[0, 300]])),
                                   CorruptStream, "envelope tiles do not fit")):
        buf = io.BytesIO()
        container.ContainerWriter(buf, changed, 2)
        with pytest.raises(error, match=match):
            ecdc.decode_bytes(buf.getvalue() + body, codec)
    fo = io.BytesIO(data)
    record = next(iter(container.ContainerReader(fo, container.read_prelude(fo))))
    payload = (len(record.payload) + 4).to_bytes(4, "little") + record.payload[4:]  # a length past the end
    head = container._HEAD.pack(container.KIND_SEGMENT, record.flags, record.items, len(payload), record.frames,
                                container.crc32(payload), record.codes_crc)
    rec = head + container.crc32(head).to_bytes(4, "little") + payload
    bad = data[: record.offset] + rec + data[record.offset + len(rec):]
    with pytest.raises(CorruptStream, match=f"segment 0 at byte {record.offset}: envelope correction of a bad length"):
        ecdc.decode_bytes(bad, codec)


def test_the_corrections_of_a_segment_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = tiny_codec24()
    data = ecdc.encode_bytes(codec, _speechlike(1.0), 3.0, segment_seconds=0.5, correct_envelope=True)
    monkeypatch.setattr(streamspec, "MAX_CORRECTIONS", 100)  # a segment of 0.52 s holds 13 tiles x 20 bands
    with pytest.raises(CorruptStream, match="segment 0 at byte .*: 260 envelope corrections exceed the limit"):
        ecdc.decode_bytes(data, codec)
    with pytest.raises(UnsupportedAudio, match="too many for the envelope correction; encode with envelope=False"):
        ecdc.encode_bytes(codec, _speechlike(1.0), 3.0, segment_seconds=0.5, correct_envelope=True)
