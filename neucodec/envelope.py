"""Envelope correction: how far decoded audio's coarse spectral envelope is from its input's, and its repair.

The decoder renders the slowly varying spectrum roughly right but not how energy moves between
neighbouring bands from one syllable to the next, and ViSQOL is as sensitive to that as to white
noise at 20 dB SNR (docs/training.md, "Where the error is"). The encoder knows both signals, so it
can say, cheaply, what is missing: on a grid of tiles, `bins` STFT bins by `hops` STFT hops
(400 Hz x 40 ms at 24 kHz, so a tile spans exactly three code frames), the difference in dB between
the mean power of the input and of the decoded audio, rounded to `step_db` (`measure`). The decoder
turns those integers into gains, interpolated linearly between tile centres in time and in
frequency, and applies them to its own output's STFT (`apply`); the fine structure and the phase
stay the codec's. Only the first `bands` bands are coded (8 kHz at 24 kHz); above them the gain
falls to 0 dB within one band.

The STFT is a square-root periodic Hann window of two hops, hop `hop`, analysis and synthesis, so
with all gains 0 dB `apply` returns its input (to rounding). Shapes: audio [samples] float64;
steps [bands, tiles] int.

`encode_steps`/`decode_steps` range-code the corrections tile by tile (constriction's queue coder,
`Categorical(perfect=False)`, one call per tile), each value with the probabilities of a fixed table
given the previous tile's value in the same band (0 before the first tile). The table is float32,
so the same bits everywhere; `transition_table` fits one (`bin/fit_envelope.py`: on the train split).

Not yet part of the .ecdc format: `bin/probe_envelope.py` measures what it would buy.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import constriction
import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
    """The tile grid and the quantizer of the correction."""

    hop: int = 240  # samples; the window is two hops
    bins: int = 8  # STFT bins per band
    hops: int = 4  # STFT hops per tile
    bands: int = 20  # coded bands, from 0 Hz
    step_db: float = 6.0
    max_steps: int = 7  # corrections are clipped to +-max_steps
    floor_db: float = -90.0  # tiles of the input below this level get no correction

    @property
    def window(self) -> int:
        return 2 * self.hop

    @property
    def tile(self) -> int:
        """Samples per tile."""
        return self.hop * self.hops

    def tiles(self, length: int) -> int:
        return -(-length // self.tile)


def _frames(grid: Grid, length: int) -> int:
    """STFT frames covering `length` samples: frame k is centred on sample k * hop."""
    return grid.tiles(length) * grid.hops + 1


def _window(grid: Grid) -> np.ndarray:
    n = grid.window
    return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n))


def stft(x: np.ndarray, grid: Grid) -> np.ndarray:
    """[samples] -> [bins, frames] complex; frame k centred on sample k * hop."""
    n = _frames(grid, len(x))
    padded = np.zeros((n + 1) * grid.hop)
    padded[grid.hop: grid.hop + len(x)] = x
    idx = np.arange(n)[:, None] * grid.hop + np.arange(grid.window)[None, :]
    return np.fft.rfft(padded[idx] * _window(grid), axis=1).T


def istft(spec: np.ndarray, grid: Grid, length: int) -> np.ndarray:
    """Inverse of `stft` (overlap-add with the same window), trimmed to `length` samples."""
    frames = np.fft.irfft(spec.T, grid.window, axis=1) * _window(grid)
    out = np.zeros((spec.shape[1] + 1) * grid.hop)
    for k in range(2):  # frames of even and odd index do not overlap among themselves
        part = frames[k::2]
        start = k * grid.hop
        out[start: start + part.size] += part.ravel()[: len(out) - start]
    return out[grid.hop: grid.hop + length]


def levels(x: np.ndarray, grid: Grid) -> np.ndarray:
    """Mean power per tile in dB (white noise of RMS r: about 20 log10 r), [bands, tiles]."""
    power = np.abs(stft(x, grid)[: grid.bands * grid.bins, :-1]) ** 2 / np.sum(_window(grid) ** 2)
    t = power.shape[1] // grid.hops
    blocks = power.reshape(grid.bands, grid.bins, t, grid.hops).mean(axis=(1, 3))
    return 10 * np.log10(blocks + 1e-20)


def measure(reference: np.ndarray, decoded: np.ndarray, grid: Grid = Grid()) -> np.ndarray:
    """The correction that brings `decoded`'s tile levels to `reference`'s, in steps [bands, tiles]."""
    if len(decoded) != len(reference):
        raise ValueError(f"decoded audio has {len(decoded)} samples, the reference {len(reference)}")
    want, have = levels(reference, grid), levels(decoded, grid)
    steps = np.rint((want - have) / grid.step_db)
    steps[want < grid.floor_db] = 0
    return np.clip(steps, -grid.max_steps, grid.max_steps).astype(np.int8)


def _interpolate(values: np.ndarray, centres: np.ndarray, n: int) -> np.ndarray:
    """Piecewise-linear rows over positions 0..n-1 from `values` [..., len(centres)] at `centres`."""
    pos = np.arange(n)
    return np.stack([np.interp(pos, centres, row) for row in values.reshape(-1, values.shape[-1])]) \
        .reshape(*values.shape[:-1], n)


def gains_db(steps: np.ndarray, grid: Grid, frames: int) -> np.ndarray:
    """Per STFT bin and frame, [window // 2 + 1, frames]: the tile corrections interpolated."""
    n_bins = grid.window // 2 + 1
    full = np.zeros((-(-n_bins // grid.bins) + 1, steps.shape[1]))
    full[: grid.bands] = steps * grid.step_db
    band_centres = np.arange(len(full)) * grid.bins + (grid.bins - 1) / 2
    tile_centres = np.arange(steps.shape[1]) * grid.hops + (grid.hops - 1) / 2
    over_time = _interpolate(full, tile_centres, frames)  # [bands + ..., frames]
    return _interpolate(over_time.T, band_centres, n_bins).T


def apply(decoded: np.ndarray, steps: np.ndarray, grid: Grid = Grid()) -> np.ndarray:
    """`decoded` with the correction `steps` [bands, tiles] applied; the same length."""
    if steps.shape != (grid.bands, grid.tiles(len(decoded))):
        raise ValueError(f"a correction of shape {steps.shape} does not fit {len(decoded)} samples "
                         f"(expected {(grid.bands, grid.tiles(len(decoded)))})")
    spec = stft(decoded, grid)
    spec *= 10 ** (gains_db(steps, grid, spec.shape[1]) / 20)
    return istft(spec, grid, len(decoded))


def transition_counts(corrections: tp.Iterable[np.ndarray], span: int) -> np.ndarray:
    """How often each value follows each value in the same band (the first tile follows a 0), over
    corrections [bands, tiles]: [2 span + 1, 2 span + 1], row = previous value + span."""
    counts = np.zeros((2 * span + 1, 2 * span + 1))
    for steps in corrections:
        symbols = steps.astype(np.int64) + span
        previous = np.pad(symbols, ((0, 0), (1, 0)), constant_values=span)[:, :-1]
        np.add.at(counts, (previous.ravel(), symbols.ravel()), 1)
    return counts


def transition_table(corrections: tp.Iterable[np.ndarray], span: int) -> np.ndarray:
    """The table `encode_steps` wants, fitted on corrections: `transition_counts` plus 1, each row
    normalised (float64; cast to float32 to code with it)."""
    counts = transition_counts(corrections, span) + 1
    return counts / counts.sum(axis=1, keepdims=True)


def encode_steps(steps: np.ndarray, table: np.ndarray) -> bytes:
    """Corrections [bands, tiles] -> range-coded bytes (little-endian 32-bit words)."""
    span = _check_table(table)
    if steps.size and np.abs(steps).max() > span:
        raise ValueError(f"corrections beyond +-{span} steps cannot be coded with this table")
    symbols = np.ascontiguousarray(steps.astype(np.int32) + span)
    coder, family = constriction.stream.queue.RangeEncoder(), constriction.stream.model.Categorical(perfect=False)
    previous = np.full(steps.shape[0], span, np.int32)
    for t in range(steps.shape[1]):
        coder.encode(np.ascontiguousarray(symbols[:, t]), family, np.ascontiguousarray(table[previous]))
        previous = symbols[:, t]
    return coder.get_compressed().astype("<u4").tobytes()


def decode_steps(payload: bytes, table: np.ndarray, bands: int, tiles: int) -> np.ndarray:
    """Inverse of `encode_steps`: [bands, tiles] int8."""
    span = _check_table(table)
    if len(payload) % 4:
        raise ValueError(f"an envelope payload of {len(payload)} bytes is not whole 32-bit words")
    coder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    out = np.empty((bands, tiles), np.int8)
    previous = np.full(bands, span, np.int32)
    for t in range(tiles):
        previous = coder.decode(family, np.ascontiguousarray(table[previous])).astype(np.int32)
        out[:, t] = previous - span
    return out


def _check_table(table: np.ndarray) -> int:
    """The table's span m: a float32 [2m + 1, 2m + 1] of positive probabilities, row = previous value + m."""
    n = table.shape[0]
    if table.dtype != np.float32 or table.shape != (n, n) or n % 2 == 0 or not (table > 0).all():
        raise ValueError("an envelope table is a square float32 array of odd size with positive entries")
    return n // 2
