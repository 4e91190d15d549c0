"""Reconstruction losses (waveform L1, multi-scale mel), SI-SNR, and the paper's loss balancer."""
from __future__ import annotations

import typing as tp

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular HTK-scale mel filters [n_mels, n_fft // 2 + 1] (no normalisation)."""
    f_max = f_max or sample_rate / 2

    def to_mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def to_hz(m: Tensor) -> Tensor:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(torch.linspace(float(to_mel(torch.tensor(f_min))), float(to_mel(torch.tensor(f_max))), n_mels + 2))
    lower = (freqs[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - freqs[None]) / (edges[2:, None] - edges[1:-1, None])
    return torch.clamp(torch.minimum(lower, upper), min=0.0)


class MelSpectrogram(nn.Module):
    """Magnitude mel spectrogram of a normalised STFT; [B, C, T] -> [B, C, n_mels, frames]."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int = 64) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T = x.shape
        pad = self.n_fft // 2
        flat = F.pad(x.reshape(B * C, 1, T), (pad, pad), mode="reflect" if T > pad else "constant")[:, 0]
        spec = torch.stft(flat, self.n_fft, self.hop, window=self.window, normalized=True,
                          center=False, return_complex=True).abs()
        mel = torch.matmul(self.fb, spec)
        return mel.view(B, C, *mel.shape[-2:])


class MultiScaleMelLoss(nn.Module):
    """Sum over windows 2^i (i in `scales`, hop 2^i / 4) of L1(mel) + alpha * L2(log mel), averaged.

    The paper's frequency loss (windows 2^5..2^11, 64 mels, alpha = 1).
    """

    def __init__(self, sample_rate: int, scales: tp.Sequence[int] = range(5, 12), n_mels: int = 64,
                 alpha: float = 1.0, floor: float = 1e-5) -> None:
        super().__init__()
        self.mels = nn.ModuleList([MelSpectrogram(sample_rate, 2 ** i, 2 ** i // 4, n_mels) for i in scales])
        self.alpha, self.floor = alpha, floor

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        total = x.new_zeros(())
        for mel in self.mels:
            a, b = mel(x_hat), mel(x)
            total = total + F.l1_loss(a, b)
            total = total + self.alpha * F.mse_loss(torch.log(self.floor + a), torch.log(self.floor + b))
        return total / (len(self.mels) * (1 + self.alpha))


def mel_distance(x_hat: Tensor, x: Tensor, sample_rate: int) -> float:
    """Evaluation metric: mean |log10 mel| difference at one scale (n_fft 1024, 80 mels)."""
    mel = MelSpectrogram(sample_rate, 1024, 256, 80).to(x.device)
    return float((torch.log10(1e-5 + mel(x_hat)) - torch.log10(1e-5 + mel(x))).abs().mean())


def si_snr(x_hat: Tensor, x: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SNR in dB per item, [B, C, T] -> [B]."""
    x_hat = x_hat.flatten(1) - x_hat.flatten(1).mean(-1, keepdim=True)
    x = x.flatten(1) - x.flatten(1).mean(-1, keepdim=True)
    proj = (x_hat * x).sum(-1, keepdim=True) / (x.pow(2).sum(-1, keepdim=True) + eps) * x
    noise = x_hat - proj
    return 10 * torch.log10((proj.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


class Balancer:
    """Loss balancer (paper §3.4): each loss gets the fraction of the gradient its weight says.

    For losses l_i of the model output x_hat, with g_i = dl_i / dx_hat, the gradient sent back
    through the model is

        G = sum_i  R * (w_i / sum_j w_j) * g_i / EMA(|g_i|)

    where |g_i| is the L2 norm per batch item averaged over the batch and EMA is a bias-corrected
    exponential average (decay 0.999). So no loss can dominate by scale alone: with R = 1 the
    rescaled gradients have norm ~ w_i / sum w, whatever the losses' units. Losses that do not
    go through x_hat (the commitment loss) are back-propagated separately, unbalanced.

    Monitor `metrics` (ratio_*: each loss's measured share of the gradient norm).
    """

    def __init__(self, weights: dict[str, float], total_norm: float = 1.0, ema_decay: float = 0.999,
                 per_batch_item: bool = True, eps: float = 1e-12) -> None:
        self.weights = dict(weights)
        self.total_norm, self.decay, self.per_item, self.eps = total_norm, ema_decay, per_batch_item, eps
        self.fix: dict[str, float] = {}  # running weighted sums, for bias-corrected EMA
        self.count: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, tp.Any]:
        return {"fix": dict(self.fix), "count": dict(self.count)}

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        self.fix, self.count = dict(state["fix"]), dict(state["count"])

    def _ema(self, name: str, value: float) -> float:
        self.fix[name] = self.decay * self.fix.get(name, 0.0) + value
        self.count[name] = self.decay * self.count.get(name, 0.0) + 1.0
        return self.fix[name] / self.count[name]

    def backward(self, losses: dict[str, Tensor], output: Tensor) -> None:
        output.backward(self.gradient(losses, output))

    def gradient(self, losses: dict[str, Tensor], output: Tensor) -> Tensor:
        """The balanced gradient to back-propagate from `output` (losses' graphs are kept)."""
        grads, norms = {}, {}
        for name, loss in losses.items():
            if self.weights.get(name, 0.0) == 0.0:
                continue
            (g,) = torch.autograd.grad(loss, [output], retain_graph=True)
            norm = g.flatten(1).norm(dim=1).mean() if self.per_item else g.norm()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(norm)
                norm = norm / dist.get_world_size()
            grads[name], norms[name] = g, float(norm)
        total_weight = sum(self.weights[n] for n in grads)
        out_grad = torch.zeros_like(output)
        for name, g in grads.items():
            scale = self.total_norm * self.weights[name] / total_weight / (self.eps + self._ema(name, norms[name]))
            out_grad.add_(g, alpha=scale)
        total = sum(norms.values()) or 1.0
        self.metrics = {f"ratio_{n}": v / total for n, v in norms.items()}
        return out_grad


def hinge_discriminator_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Mean over scales of E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat))]."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(real)  # type: ignore[return-value]


def hinge_generator_loss(fake: list[Tensor]) -> Tensor:
    """The paper's generator term: mean over scales of E[max(0, 1 - D(x_hat))]."""
    return sum(F.relu(1 - f).mean() for f in fake) / len(fake)  # type: ignore[return-value]


def relative_feature_loss(real: list[list[Tensor]], fake: list[list[Tensor]]) -> Tensor:
    """Relative feature matching: mean over scales and layers of |f(x) - f(x_hat)|_1 / mean|f(x)|."""
    total, n = 0.0, 0
    for fr, ff in zip(real, fake):
        for a, b in zip(fr, ff):
            a = a.detach()
            total = total + (a - b).abs().mean() / (a.abs().mean() + 1e-8)
            n += 1
    return total / max(n, 1)  # type: ignore[return-value]
