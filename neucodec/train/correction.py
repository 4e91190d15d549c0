"""The envelope correction (`neucodec.envelope`) as training sees it: differentiable in the decoded audio.

A user of the default model hears the decoder's output with its envelope correction applied (the
encoder measures it against the input and the file carries it), so a decoder can be trained on
that: `corrected` measures the correction of each item as the encoder would (`envelope.measure`,
rounded to steps, so a constant for the gradient) and applies its gains to the decoded audio's STFT.
The gains multiply the STFT, so the gradient reaches the decoder through them: the losses ask for
what the correction cannot give, the detail within a tile.

It is `envelope.apply` on one segment, in torch: the same square-root Hann STFT, frames centred on
multiples of the hop, the same interpolated gains (`envelope.gains_db`); equal to it on whole tiles
(a training crop of 1 s is 25 tiles of `e3`), near it in the last tile otherwise.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import envelope

Tensor = torch.Tensor


def corrected(x_hat: Tensor, reference: Tensor, grid: envelope.Grid) -> Tensor:
    """`x_hat` [B, 1, T] with each item's envelope correction against `reference` [B, 1, T] applied."""
    length = x_hat.shape[-1]
    window = torch.sqrt(torch.hann_window(grid.window, periodic=True, dtype=x_hat.dtype, device=x_hat.device))
    spec = torch.stft(x_hat[:, 0], grid.window, grid.hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [B, window // 2 + 1, frames]; frame k centred on sample k * hop
    ref, dec = (a[:, 0].detach().double().cpu().numpy() for a in (reference, x_hat))
    gains = np.stack([envelope.gains_db(envelope.measure(r, d, grid), grid, spec.shape[-1]) for r, d in zip(ref, dec)])
    gains = torch.from_numpy(10 ** (gains / 20)).to(spec.real.dtype).to(x_hat.device)
    return torch.istft(spec * gains, grid.window, grid.hop, window=window, center=True, length=length)[:, None]
