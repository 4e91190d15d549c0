"""Residual vector quantizer: latents [B, D, T] <-> codes [B, K, T], with EMA codebook training.

Inference mirrors the reference exactly (same distance expression, first index wins ties) so codes
are identical. Training follows the paper: EMA codebooks (decay 0.99), k-means initialisation,
dead-code replacement, and a straight-through estimator applied once to the sum, which gives every
residual layer its own commitment gradient (the reference's training path gives it to the first only).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import RVQConfig
from .layers import one_thread

Tensor = torch.Tensor
_ENCODE_BLOCK = 16384  # rows per distance matrix: bounds memory on long inputs


@dataclasses.dataclass
class QuantizedResult:
    quantized: Tensor  # [B, D, T], straight-through in training
    codes: Tensor  # [B, K, T]
    commit_loss: Tensor  # scalar, summed over layers
    n_q: int
    layer_losses: list[Tensor] = dataclasses.field(default_factory=list)  # commitment per layer


def _sample_vectors(samples: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device, generator=generator)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device, generator=generator)
    return samples[idx]


def _kmeans_plus_plus(samples: Tensor, num_clusters: int) -> Tensor:
    """k-means++ seeding: each new centre is drawn with probability proportional to D(x)^2."""
    centers = [samples[int(torch.randint(0, samples.shape[0], ()))]]
    d2 = (samples - centers[0]).pow(2).sum(1)
    for _ in range(1, num_clusters):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than clusters
            idx = int(torch.randint(0, samples.shape[0], ()))
        else:
            idx = int(torch.multinomial(d2 / total, 1))
        centers.append(samples[idx])
        d2 = torch.minimum(d2, (samples - samples[idx]).pow(2).sum(1))
    return torch.stack(centers)


def kmeans(samples: Tensor, num_clusters: int, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding on [N, D] samples; returns (means, cluster sizes)."""
    means = _kmeans_plus_plus(samples, num_clusters)
    bins = torch.zeros(num_clusters, device=samples.device)
    for _ in range(iters):
        dists = (samples.pow(2).sum(1, keepdim=True) - 2 * samples @ means.t()
                 + means.pow(2).sum(1)[None])
        buckets = dists.argmin(dim=-1)
        bins = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        new_means = torch.zeros_like(means).index_add_(0, buckets, samples)
        new_means = new_means / bins.clamp(min=1)[:, None]
        means = torch.where(bins[:, None] == 0, means, new_means)
    return means, bins


class EuclideanCodebook(nn.Module):
    """One codebook; buffers `inited`, `cluster_size`, `embed`, `embed_avg` as in the checkpoints."""

    def __init__(self, dim: int, bins: int, decay: float = 0.99, kmeans_init: bool = True,
                 kmeans_iters: int = 50, threshold_ema_dead_code: float = 2.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.eps, self.bins = decay, eps, bins
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        embed = torch.zeros(bins, dim) if kmeans_init else nn.init.kaiming_uniform_(torch.empty(bins, dim))
        self.register_buffer("inited", torch.Tensor([not kmeans_init]))
        self.register_buffer("cluster_size", torch.zeros(bins))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    def encode(self, x: Tensor) -> Tensor:
        """[N, D] -> [N] nearest entries (the reference's expression, so ties resolve the same)."""
        embed = self.embed.t()
        out = []
        for block in x.split(_ENCODE_BLOCK):
            neg_dist = -(block.pow(2).sum(1, keepdim=True) - 2 * block @ embed + embed.pow(2).sum(0, keepdim=True))
            out.append(neg_dist.max(dim=-1).indices)
        return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)

    def decode(self, codes: Tensor) -> Tensor:
        return F.embedding(codes, self.embed)

    @torch.no_grad()
    def init_from(self, samples: Tensor) -> None:
        """k-means initialisation on [N, D] latents (done once, before the first EMA update)."""
        means, bins = kmeans(samples, self.bins, self.kmeans_iters)
        self.embed.copy_(means)
        self.embed_avg.copy_(means)
        self.cluster_size.copy_(bins)
        self.inited.fill_(1)

    @torch.no_grad()
    def ema_update(self, x: Tensor, codes: Tensor) -> int:
        """EMA codebook update from a batch [N, D]; replaces dead codes. Returns how many."""
        if not self.inited.item():
            self.init_from(x)
        onehot = F.one_hot(codes, self.bins).to(x.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ x
        if dist.is_available() and dist.is_initialized():  # every worker sees the same codebook
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.bins * self.eps) * total
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.threshold_ema_dead_code
        n_dead = int(dead.sum())
        if n_dead:
            # a replaced code starts at the mean usage, a grace period before it can expire again
            fresh = _sample_vectors(x, n_dead)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(fresh, 0)
            grace = self.cluster_size.mean().clamp(min=self.threshold_ema_dead_code * 2)
            self.embed[dead] = fresh
            self.embed_avg[dead] = fresh * grace
            self.cluster_size[dead] = grace
        return n_dead


class VectorQuantization(nn.Module):
    """Holds one `_codebook` (the checkpoint key); no projection since codebook dim = latent dim."""

    def __init__(self, cfg: RVQConfig) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(cfg.dimension, cfg.bins, cfg.decay, cfg.kmeans_init,
                                           cfg.kmeans_iters, cfg.threshold_ema_dead_code)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, cfg: RVQConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(cfg) for _ in range(cfg.n_q)])


class ResidualVectorQuantizer(nn.Module):
    """`n_q` residual codebooks; `.vq.layers.{i}._codebook` matches the official state_dict."""

    def __init__(self, cfg: RVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_q = cfg.n_q
        self.bins = cfg.bins
        self.vq = ResidualVectorQuantization(cfg)

    def _codebook(self, i: int) -> EuclideanCodebook:
        return self.vq.layers[i]._codebook  # type: ignore[return-value]

    def encode(self, z: Tensor, n_q: int) -> Tensor:
        """Latents [B, D, T] -> codes [B, K=n_q, T]."""
        B, D, T = z.shape
        residual = z.transpose(1, 2).reshape(B * T, D)
        codes = []
        with one_thread(enabled=B == 1):  # one signal: small ops, barriers would cost more than they save
            for i in range(n_q):
                book = self._codebook(i)
                idx = book.encode(residual)
                residual = residual - book.decode(idx)
                codes.append(idx.view(B, T))
        return torch.stack(codes, dim=1) if codes else z.new_zeros(B, 0, T, dtype=torch.long)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes [B, K, T] -> latents [B, D, T]: the sum of the K looked-up entries (K <= n_q)."""
        if codes.shape[1] > self.n_q:
            raise ValueError(f"codes have {codes.shape[1]} codebooks but the quantizer has {self.n_q}")
        out: Tensor | None = None
        with one_thread(enabled=codes.shape[0] == 1):
            for i in range(codes.shape[1]):
                q = self._codebook(i).decode(codes[:, i]).transpose(1, 2)  # [B, D, T]
                out = q if out is None else out + q
        if out is None:
            raise ValueError("codes need at least one codebook")
        return out

    def forward(self, z: Tensor, n_q: int) -> QuantizedResult:
        """Training/eval pass: quantize with the first `n_q` codebooks, update them if training."""
        B, D, T = z.shape
        if n_q == 0:  # bypass: the plain autoencoder
            return QuantizedResult(z, z.new_zeros(B, 0, T, dtype=torch.long), z.new_zeros(()), 0)
        flat = z.transpose(1, 2).reshape(B * T, D)
        residual = flat
        quantized = torch.zeros_like(flat)
        layer_losses = []
        codes = []
        for i in range(n_q):
            book = self._codebook(i)
            if self.training and not book.inited.item():
                book.init_from(residual.detach())
            idx = book.encode(residual.detach())
            q = book.decode(idx).detach()
            layer_losses.append(F.mse_loss(residual, q))
            if self.training:
                book.ema_update(residual.detach(), idx)
            residual = residual - q
            quantized = quantized + q
            codes.append(idx.view(B, T))
        if self.training:
            quantized = flat + (quantized - flat).detach()  # straight-through, once, on the sum
        out = quantized.view(B, T, D).transpose(1, 2)
        return QuantizedResult(out, torch.stack(codes, 1), torch.stack(layer_losses).sum(), n_q, layer_losses)
