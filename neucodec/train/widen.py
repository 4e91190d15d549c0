"""Change a codec's latent without changing what it computes: widen it (more dimensions) or whiten it.

The encoder's last convolution gains output channels with small random weights (so the new latent
dimensions carry a little signal and receive gradients), the decoder's first convolution gains
input channels with zero weights (so the output is unchanged until training uses them), and the
codebooks gain zero coordinates. With weight normalisation, zero input columns leave each output
channel's norm as it was, so the decoder is exactly the same function. The codebooks should be
initialised afresh once the new dimensions carry something (`TrainConfig.reinit_codebooks`).

Whitening maps the latent z to A (z - mean), A scaling every principal direction to the same
variance (`whiten_latent`); the decoder's first convolution takes A's inverse and the mean into its
weights and bias. A direction the encoder barely uses gets a small gradient through a decoder that
barely reads it, and the other way round: each waits for the other. Whitened, the decoder sees
every direction at full scale.
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


def _weight(state: dict[str, Tensor], conv: str) -> Tensor:
    return torch._weight_norm(state[conv + ".weight_v"].float(), state[conv + ".weight_g"].float(), 0)


def _set_weight(out: dict[str, Tensor], conv: str, weight: Tensor) -> None:
    out[conv + ".weight_v"] = weight
    out[conv + ".weight_g"] = torch.norm_except_dim(weight, 2, 0)


def whiten_latent(state: dict[str, Tensor], latents: Tensor, floor: float = 1e-3) -> dict[str, Tensor]:
    """A copy of the codec `state` whose latent is whitened, from `latents` [N, dim] the encoder gave.

    Each principal direction is scaled to the same variance (directions below `floor` times the
    largest are scaled as if they had that much), keeping the latent's total variance. The decoder is
    the same function; the codebooks are mapped along, but they must be initialised afresh, since
    distances between latents change."""
    latents = latents.double()
    mean = latents.mean(0)
    cov = torch.cov(latents.T)
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp(min=floor * float(values.max()))
    scale = (float(torch.diagonal(cov).sum()) / len(values)) ** 0.5
    a = scale * vectors @ torch.diag(values ** -0.5) @ vectors.T
    a_inv = vectors @ torch.diag(values ** 0.5) @ vectors.T / scale
    out = dict(state)
    enc, dec = _last_encoder_conv(state), "decoder.model.0.conv.conv"
    _set_weight(out, enc, torch.einsum("ij,jkl->ikl", a, _weight(state, enc).double()).float())
    out[enc + ".bias"] = (a @ (state[enc + ".bias"].double() - mean)).float()
    w_dec = _weight(state, dec).double()
    _set_weight(out, dec, torch.einsum("ojk,ji->oik", w_dec, a_inv).float())
    out[dec + ".bias"] = (state[dec + ".bias"].double() + w_dec.sum(-1) @ mean).float()
    for key, value in state.items():  # the first codebook holds latents, the others residuals
        first = ".layers.0._codebook." in key
        if key.endswith("._codebook.embed"):
            out[key] = ((value.double() - (mean if first else 0)) @ a.T).float()
        elif key.endswith("._codebook.embed_avg"):  # sums of latents: embed times the cluster sizes
            size = state[key.replace("embed_avg", "cluster_size")].double()[:, None]
            out[key] = ((value.double() - (size * mean if first else 0)) @ a.T).float()
    return out
