"""Widen a codec's latent (more dimensions) without changing what it computes.

The encoder's last convolution gains output channels with small random weights (so the new latent
dimensions carry a little signal and receive gradients), the decoder's first convolution gains
input channels with zero weights (so the output is unchanged until training uses them), and the
codebooks gain zero coordinates. With weight normalisation, zero input columns leave each output
channel's norm as it was, so the decoder is exactly the same function. The codebooks should be
initialised afresh once the new dimensions carry something (`TrainConfig.reinit_codebooks`).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _last_encoder_conv(state: dict[str, Tensor]) -> str:
    convs = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("encoder.") and k.endswith("conv.weight_v")},
                   key=lambda k: int(k.split(".")[2]))
    return convs[-1]


def latent_dim(state: dict[str, Tensor]) -> int:
    return int(state[_last_encoder_conv(state) + ".weight_v"].shape[0])


def widen_latent(state: dict[str, Tensor], dim: int, scale: float = 0.1, seed: int = 0) -> dict[str, Tensor]:
    """A copy of the codec `state` (weight-normalised, as neucodec's and the reference's) with a latent
    of `dim` dimensions. The new encoder output channels get random directions and a norm of `scale`
    times the existing channels' mean norm."""
    old = latent_dim(state)
    if dim < old:
        raise ValueError(f"the latent has {old} dimensions already; cannot widen it to {dim}")
    out = dict(state)
    if dim == old:
        return out
    extra = dim - old
    gen = torch.Generator().manual_seed(seed)
    enc = _last_encoder_conv(state)
    v, g = state[enc + ".weight_v"], state[enc + ".weight_g"]
    out[enc + ".weight_v"] = torch.cat([v, torch.randn((extra, *v.shape[1:]), generator=gen, dtype=v.dtype)])
    out[enc + ".weight_g"] = torch.cat([g, torch.full((extra, *g.shape[1:]), scale * float(g.abs().mean()),
                                                      dtype=g.dtype)])
    out[enc + ".bias"] = torch.cat([state[enc + ".bias"], state[enc + ".bias"].new_zeros(extra)])
    dec = "decoder.model.0.conv.conv"
    v = state[dec + ".weight_v"]
    out[dec + ".weight_v"] = torch.cat([v, v.new_zeros((v.shape[0], extra, *v.shape[2:]))], dim=1)
    for key, value in state.items():
        if key.endswith("._codebook.embed") or key.endswith("._codebook.embed_avg"):
            out[key] = torch.cat([value, value.new_zeros((value.shape[0], extra))], dim=1)
    return out
