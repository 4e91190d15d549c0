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
falls to 0 dB within one band. Bands may widen higher up (`Grid.wider`), where hearing resolves less.

The STFT (`stft`) is a square-root periodic Hann window of two hops, hop `hop`, analysis and
synthesis, so with all gains 0 dB `apply` returns its input (to rounding). Shapes: audio [samples] float64;
steps [bands, tiles] int; for several channels (`Corrector`, `encode_steps`) [rows, bands, tiles].

`encode_steps`/`decode_steps` range-code the corrections (constriction's queue coder,
`Categorical(perfect=False)`), each value with the probabilities of a fixed table given its context:
its band's value at the tile before and the value of the band below in the same tile (0 outside the
grid). The tables are float32, so the same bits everywhere; `transition_table` fits one
(`bin/fit_envelope.py`: on the train split), and files name theirs (`table`, `TABLE_FILE`; part of
the .ecdc format, docs/FORMAT.md §4.5).

In an .ecdc file (`neucodec.writer`, `neucodec.reader`), each segment carries the corrections of its own tiles, and the
decoder applies them as it streams (`Corrector`): within a segment the gains are interpolated
between its tiles' centres and held from its first centre back to its start and from its last one
on to its end, so segments stay independent. `apply` is one segment, all at once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import typing as tp
from pathlib import Path

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
    #: wider bands higher up: (from bin, bins per band) pairs, ascending; a band starting at or above
    #: a pair's bin has its width (`e4`: 100 Hz bands to 4 kHz, then 200 Hz). () is `bins` throughout.
    wider: tuple[tuple[int, int], ...] = ()

    @property
    def window(self) -> int:
        return 2 * self.hop

    @property
    def edges(self) -> np.ndarray:
        """The coded bands' first bins and, last, the bin after the top band: [bands + 1]."""
        edges = [0]
        for _ in range(self.bands):
            edges.append(edges[-1] + next((w for b, w in reversed(self.wider) if edges[-1] >= b), self.bins))
        return np.asarray(edges)

    @property
    def top(self) -> int:
        """The bin after the top coded band."""
        return int(self.edges[-1])

    @property
    def tile(self) -> int:
        """Samples per tile."""
        return self.hop * self.hops

    def tiles(self, length: int) -> int:
        return -(-length // self.tile)


#: The probability tables of the corrections, by name, in `envelope_tables.json` beside this file:
#: integer weights [n, n, n] (n = 2 span + 1) indexed [before + span, below + span, value + span]
#: (`contexts`); the probabilities are each weight over the sum of its context's n weights, in
#: float64, then rounded to float32 (`table`). Part of the .ecdc format (docs/FORMAT.md §4.5): never
#: change a table; a new one gets a new name (`bin/fit_envelope.py` adds one, fitted on the train split).
TABLE_FILE = Path(__file__).with_name("envelope_tables.json")


@functools.cache
def _tables() -> dict[str, tp.Any]:
    return json.loads(TABLE_FILE.read_text())


def table_names() -> tuple[str, ...]:
    return tuple(_tables())


def table_grid(name: str) -> Grid:
    """The grid a table was fitted on: what a file coded with it uses (its hop: 10 ms at the codec's rate)."""
    grid = dict(_tables()[name]["fitted_on"]["grid"])
    wider = tuple(tuple(pair) for pair in grid.pop("wider", ()))
    return Grid(**grid, wider=wider)


def table(name: str) -> np.ndarray:
    """The float32 table `encode_steps`/`decode_steps` take, of the weights named `name`."""
    weights = np.asarray(_tables()[name]["weights"], np.float64)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


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


def levels(x: np.ndarray, grid: Grid) -> np.ndarray:
    """Mean power per tile in dB (white noise of RMS r: about 20 log10 r), [bands, tiles]."""
    power = np.abs(stft(x, grid)[: grid.top, :-1]) ** 2 / np.sum(_window(grid) ** 2)
    t = power.shape[1] // grid.hops
    if grid.wider:
        edges = grid.edges
        frames = power.reshape(grid.top, t, grid.hops).mean(axis=2)
        blocks = np.add.reduceat(frames, edges[:-1], axis=0) / np.diff(edges)[:, None]
    else:
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
    centres = band_centres(grid, n_bins)
    full = np.zeros((len(centres), steps.shape[1]))
    full[: grid.bands] = steps * grid.step_db
    tile_centres = np.arange(steps.shape[1]) * grid.hops + (grid.hops - 1) / 2
    over_time = _interpolate(full, tile_centres, frames)  # [bands + ..., frames]
    return _interpolate(over_time.T, centres, n_bins).T


def band_centres(grid: Grid, n_bins: int) -> np.ndarray:
    """Centre bins of the coded bands, then of bands as wide as the top one on past the last bin
    (their gains are 0 dB)."""
    edges = grid.edges
    top, width = int(edges[-1]), int(edges[-1] - edges[-2])
    above = top + np.arange(max(0, -(-(n_bins - top) // width)) + 1) * width
    return np.concatenate([edges[:-1] + (np.diff(edges) - 1) / 2, above + (width - 1) / 2])


def apply(decoded: np.ndarray, steps: np.ndarray, grid: Grid = Grid()) -> np.ndarray:
    """`decoded` with the correction `steps` [bands, tiles] applied, as one segment; the same length."""
    if steps.shape != (grid.bands, grid.tiles(len(decoded))):
        raise ValueError(f"a correction of shape {steps.shape} does not fit {len(decoded)} samples "
                         f"(expected {(grid.bands, grid.tiles(len(decoded)))})")
    corrector = Corrector(grid, 1)
    corrector.add(steps[None])
    return np.concatenate([corrector.push(decoded[None]), corrector.finish()], axis=1)[0]


class Corrector:
    """`apply`, streaming: the corrections come a segment at a time (`add`, before the audio they
    cover), the decoded audio in chunks of any size (`push`), each call returning what has become
    final; `finish` returns the rest. Rows (channels) are corrected independently; audio [rows, t].

    Each segment's gains are `gains_db` of its own tiles alone, and after the last segment the last
    gain holds. Latency: one hop, and whatever of the audio has no corrections yet.
    """

    def __init__(self, grid: Grid, rows: int) -> None:
        self.grid, self.win = grid, _window(grid)
        self.x = np.zeros((rows, grid.hop))  # input from sample `start` on (first: the hop of padding)
        self.start = -grid.hop
        self.gains = np.zeros((rows, grid.window // 2 + 1, 0))  # linear, of frames `frame`, `frame` + 1, ...
        self.last: np.ndarray | None = None  # the last segment's last frame's gains, held after it
        self.tail = np.zeros((rows, grid.hop))  # the second half of the last frame run
        self.frame = 0  # next frame to run, centred on sample frame * hop
        self.emitted = 0

    def add(self, steps: np.ndarray) -> None:
        """The next segment's corrections [rows, bands, tiles]."""
        g = np.stack([gains_db(s, self.grid, s.shape[1] * self.grid.hops) for s in steps])
        self.gains = np.concatenate([self.gains, 10 ** (g / 20)], axis=2)
        self.last = self.gains[:, :, -1:]

    def push(self, audio: np.ndarray) -> np.ndarray:
        self.x = np.concatenate([self.x, audio], axis=1)
        ready = (self.start + self.x.shape[1]) // self.grid.hop - self.frame  # frames whose window is in
        return self._run(min(ready, self.gains.shape[2]))

    def finish(self) -> np.ndarray:
        """The rest of the audio: the signal ends with the last `push`."""
        hop, length = self.grid.hop, self.start + self.x.shape[1]
        frames = -(-length // hop) + 1 - self.frame  # up to the frame centred at or after the end
        if frames <= 0 or self.last is None:
            return self.x[:, :0]
        self.x = np.pad(self.x, ((0, 0), (0, (self.frame + frames) * hop + hop - self.start - self.x.shape[1])))
        held = np.repeat(self.last, max(0, frames - self.gains.shape[2]), axis=2)
        self.gains = np.concatenate([self.gains, held], axis=2)
        left = length - self.emitted
        return self._run(frames)[:, :left]

    def _run(self, n: int) -> np.ndarray:
        """Run the next n frames; returns the samples they finish."""
        hop = self.grid.hop
        if n <= 0:
            return self.x[:, :0]
        first = (self.frame - 1) * hop - self.start  # frame k's window starts at sample (k - 1) * hop
        idx = first + np.arange(n)[:, None] * hop + np.arange(2 * hop)[None, :]
        spec = np.fft.rfft(self.x[:, idx] * self.win, axis=2) * self.gains[:, :, :n].transpose(0, 2, 1)
        y = np.fft.irfft(spec, 2 * hop, axis=2) * self.win  # [rows, n, window]
        out = y[:, :, :hop].copy()  # frame k's first half ends the samples (k - 1) * hop .. k * hop
        out[:, 0] += self.tail
        out[:, 1:] += y[:, :-1, hop:]
        self.tail = y[:, -1, hop:]
        out = out.reshape(len(out), -1)[:, hop if self.frame == 0 else 0:]  # the padding's samples go
        self.frame += n
        self.gains = self.gains[:, :, n:]
        self.x = self.x[:, (self.frame - 1) * hop - self.start:]
        self.start = (self.frame - 1) * hop
        self.emitted += out.shape[1]
        return out


def contexts(symbols: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """(before, below) of symbols [..., bands, tiles]: each one's band's value at the tile before,
    and the value of the band below in the same tile; `fill` (the symbol of 0) outside the grid."""
    pad = [(0, 0)] * (symbols.ndim - 2)
    before = np.pad(symbols, pad + [(0, 0), (1, 0)], constant_values=fill)[..., :-1]
    below = np.pad(symbols, pad + [(1, 0), (0, 0)], constant_values=fill)[..., :-1, :]
    return before, below


def transition_counts(corrections: tp.Iterable[np.ndarray], span: int) -> np.ndarray:
    """How often each value comes in each context (`contexts`: the band's value at the tile before,
    the value of the band below), over corrections [..., bands, tiles]: [n, n, n] with
    n = 2 span + 1, indexed [before + span, below + span, value + span]."""
    counts = np.zeros((2 * span + 1,) * 3)
    for steps in corrections:
        symbols = steps.astype(np.int64) + span
        before, below = contexts(symbols, span)
        np.add.at(counts, (before.ravel(), below.ravel(), symbols.ravel()), 1)
    return counts


def transition_table(corrections: tp.Iterable[np.ndarray], span: int) -> np.ndarray:
    """A table `encode_steps` takes, fitted on corrections: `transition_counts` plus 1, normalised
    per context (float64; cast to float32 to code with it)."""
    counts = transition_counts(corrections, span) + 1
    return counts / counts.sum(axis=-1, keepdims=True)


def encode_steps(steps: np.ndarray, table: np.ndarray) -> bytes:
    """Corrections [rows, bands, tiles] -> range-coded bytes (little-endian 32-bit words): tile by
    tile, band by band from the lowest, row by row, each value with the probabilities of its context
    (`contexts`); all known here, so they go to the coder in one call."""
    span = _check_table(table)
    if steps.size and np.abs(steps).max() > span:
        raise ValueError(f"corrections beyond +-{span} steps cannot be coded with this table")
    symbols = steps.astype(np.int32) + span
    before, below = contexts(symbols, span)
    order = [np.ascontiguousarray(a.transpose(2, 1, 0)).ravel() for a in (symbols, before, below)]
    coder = constriction.stream.queue.RangeEncoder()
    coder.encode(order[0], constriction.stream.model.Categorical(perfect=False),
                 np.ascontiguousarray(table[order[1], order[2]]))
    return coder.get_compressed().astype("<u4").tobytes()


def decode_steps(payload: bytes, table: np.ndarray, rows: int, bands: int, tiles: int) -> np.ndarray:
    """Inverse of `encode_steps`: [rows, bands, tiles] int8. A value's context is only known once the
    values before it are decoded: one at a time, each with its context's model, built once."""
    span = _check_table(table)
    if len(payload) % 4:
        raise ValueError(f"an envelope payload of {len(payload)} bytes is not whole 32-bit words")
    coder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))
    models = [[constriction.stream.model.Categorical(p, perfect=False) for p in plane] for plane in table]
    symbols = np.full((tiles, bands, rows), span, np.int32)
    before = [[span] * rows for _ in range(bands)]  # each band's values at the tile before, per row
    for t in range(tiles):
        below = [span] * rows
        for b in range(bands):
            before[b] = below = [coder.decode(models[a][c]) for a, c in zip(before[b], below)]
        symbols[t] = before
    return (symbols.transpose(2, 1, 0) - span).astype(np.int8)


def _check_table(table: np.ndarray) -> int:
    """The table's span m: a float32 [n, n, n] (n = 2m + 1) of positive probabilities."""
    n = table.shape[0]
    if table.dtype != np.float32 or table.shape != (n, n, n) or n % 2 == 0 or not (table > 0).all():
        raise ValueError("an envelope table is a cubic float32 array of odd size with positive entries")
    return n // 2
