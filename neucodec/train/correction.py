"""The envelope correction (`neucodec.envelope`) as training sees it: differentiable in the decoded audio.

A user of the default model hears the decoder's output with its envelope correction applied (the
encoder measures it against the input and the file carries it), so a decoder can be trained on
that. `corrected` applies the correction that brings each tile of the decoded audio to the
input's level exactly: `envelope.apply` of `envelope.measure`, in torch, but with the gains not
rounded to steps and computed from the decoded audio's own levels, so differentiable in them. The
losses of the corrected audio are then blind to the tiles' levels (the correction sets them) and
ask for what a correction cannot give: the detail within a tile.

Why not the rounded, constant gains a file carries: with them the gradient still moves a tile's
level, the next step's rounding takes back what it moved, and a waveform loss that prefers a
quieter output (unpredictable detail costs less when smaller) ratchets the decoder's levels down
step after step while the gains rise to make up for it. Measured (2026-12-06, docs/experiments.md): 2,500 such steps
left the decoder 40 dB too quiet, the corrections at their ±42 dB limit and ViSQOL 1.6 lower. So
the levels are the correction's alone here, and the plain output's losses hold them
(`TrainConfig.envelope_share`).

Same STFT as `envelope` (square-root periodic Hann window of two hops, frames centred on multiples
of the hop), same tiles, interpolation of the gains and floor; the audio is padded with zeros to
whole tiles, as `envelope.stft` pads it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .. import envelope

Tensor = torch.Tensor


@functools.lru_cache(maxsize=8)
def _interpolation(grid: envelope.Grid, tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """The matrices of `envelope.gains_db`'s two linear interpolations: over frequency, bins from
    the band centres [window // 2 + 1, bands + extra bands held at 0 dB], and over time, frames
    from the tile centres [tiles, tiles * hops + 1]."""
    n_bins, frames = grid.window // 2 + 1, tiles * grid.hops + 1
    band_centres = envelope.band_centres(grid, n_bins)
    n_full = len(band_centres)
    tile_centres = np.arange(tiles) * grid.hops + (grid.hops - 1) / 2
    over_freq = np.stack([np.interp(np.arange(n_bins), band_centres, row) for row in np.eye(n_full)], axis=1)
    over_time = np.stack([np.interp(np.arange(frames), tile_centres, row) for row in np.eye(tiles)])
    return over_freq, over_time


@functools.lru_cache(maxsize=8)
def _band_means(grid: envelope.Grid) -> np.ndarray:
    """[bands, top]: each coded band's mean over its bins, as a matrix (bands of several widths)."""
    edges = grid.edges
    means = np.zeros((grid.bands, grid.top))
    for b in range(grid.bands):
        means[b, edges[b]: edges[b + 1]] = 1 / (edges[b + 1] - edges[b])
    return means


def corrected(x_hat: Tensor, reference: Tensor, grid: envelope.Grid) -> Tensor:
    """`x_hat` [B, 1, T] with every tile brought to `reference`'s [B, 1, T] level, as `envelope.apply`
    applies a correction (unrounded, and differentiable in `x_hat`'s levels; see the module)."""
    length = x_hat.shape[-1]
    tiles = grid.tiles(length)
    window = torch.sqrt(torch.hann_window(grid.window, periodic=True, dtype=x_hat.dtype, device=x_hat.device))

    def stft(audio: Tensor) -> Tensor:  # [B, window // 2 + 1, tiles * hops + 1], as `envelope.stft`
        padded = torch.nn.functional.pad(audio[:, 0], (0, tiles * grid.tile - length))
        return torch.stft(padded, grid.window, grid.hop, window=window, center=True, pad_mode="constant",
                          return_complex=True)

    def levels(spec: Tensor) -> Tensor:  # [B, bands, tiles] in dB, as `envelope.levels`
        power = spec[:, : grid.top, :-1].abs() ** 2 / window.pow(2).sum()
        if grid.wider:  # bands of several widths
            means = torch.from_numpy(_band_means(grid)).to(power)
            return 10 * torch.log10(means @ power.reshape(len(spec), grid.top, tiles, grid.hops).mean(dim=3) + 1e-20)
        return 10 * torch.log10(power.reshape(len(spec), grid.bands, grid.bins, tiles, grid.hops).mean(dim=(2, 4))
                                + 1e-20)

    spec = stft(x_hat)
    have = levels(spec)
    with torch.no_grad():
        want = levels(stft(reference.to(x_hat.dtype)))
    limit = grid.max_steps * grid.step_db
    tile_db = torch.where(want < grid.floor_db, torch.zeros_like(have), (want - have).clamp(-limit, limit))
    over_freq, over_time = (torch.from_numpy(m).to(have) for m in _interpolation(grid, tiles))
    full = torch.nn.functional.pad(tile_db, (0, 0, 0, over_freq.shape[1] - grid.bands))  # 0 dB above the bands
    gains_db = over_freq @ full @ over_time  # [B, bins, frames]
    y = torch.istft(spec * 10 ** (gains_db / 20), grid.window, grid.hop, window=window, center=True,
                    length=tiles * grid.tile)
    return y[:, None, :length]
