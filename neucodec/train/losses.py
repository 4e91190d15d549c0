"""Reconstruction losses (waveform L1, multi-scale mel, log STFT, compressed complex STFT, spectral NSIM,
frame comb), SI-SNR, and the paper's loss balancer."""
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


class LogStftLoss(nn.Module):
    """Mean L1 between log magnitudes of normalised STFTs with linear bins, over windows `sizes` (hop 1/4).

    At 2048 samples the bins (11.7 Hz at 24 kHz) resolve the harmonics of a voice, which 64 mel bands
    above 1 kHz average together: noise between the harmonics, which the mel loss sees only as band
    energy, costs here. The log weighs quiet bins like loud ones, so a missing component costs as much
    as a wrong one."""

    def __init__(self, sizes: tp.Sequence[int] = (512, 1024, 2048), floor: float = 1e-5) -> None:
        super().__init__()
        self.sizes, self.floor = tuple(sizes), floor
        for n in self.sizes:
            self.register_buffer(f"window{n}", torch.hann_window(n), persistent=False)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        a, b = x_hat.reshape(-1, x_hat.shape[-1]), x.reshape(-1, x.shape[-1])
        total = x.new_zeros(())
        for n in self.sizes:
            window = getattr(self, f"window{n}")
            mags = [torch.stft(F.pad(t, (n // 2, n // 2)), n, n // 4, window=window, normalized=True, center=False,
                               return_complex=True).abs() for t in (a, b)]
            total = total + (torch.log(self.floor + mags[0]) - torch.log(self.floor + mags[1])).abs().mean()
        return total / len(self.sizes)


class CompressedComplexLoss(nn.Module):
    """Mean squared distance between power-law compressed complex STFTs, |S|^p * S / |S|, over windows
    `sizes` (hop 1/4).

    Waveform L1 spends its gradient where the amplitude is, below 1 kHz in speech; magnitude losses
    never ask for the phase. Compressing each bin's magnitude (p = 0.3) while keeping its phase makes
    a quiet band's waveform count nearly as much as a loud one's: to lower this loss, the latent must
    carry the upper bands' waveform, not only their level."""

    def __init__(self, sizes: tp.Sequence[int] = (256, 512, 1024), power: float = 0.3, eps: float = 1e-8) -> None:
        super().__init__()
        self.sizes, self.power, self.eps = tuple(sizes), power, eps
        for n in self.sizes:
            self.register_buffer(f"window{n}", torch.hann_window(n), persistent=False)

    def compressed(self, x: Tensor, n: int) -> Tensor:
        spec = torch.stft(F.pad(x, (n // 2, n // 2)), n, n // 4, window=getattr(self, f"window{n}"), normalized=True,
                          center=False, return_complex=True)
        ri = torch.view_as_real(spec)
        mag2 = ri.pow(2).sum(-1, keepdim=True) + self.eps
        return ri * mag2.pow((self.power - 1) / 2)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        a, b = x_hat.reshape(-1, x_hat.shape[-1]), x.reshape(-1, x.shape[-1])
        total = x.new_zeros(())
        for n in self.sizes:
            total = total + (self.compressed(a, n) - self.compressed(b, n)).pow(2).sum(-1).mean()
        return total / len(self.sizes)


def frame_comb_loss(x_hat: Tensor, x: Tensor, hop: int) -> Tensor:
    """Mean square of the part of the error that repeats every `hop` samples (one code frame).

    A decoder that upsamples frames by transposed convolutions can stamp the same small waveform
    onto every frame: a buzz at the frame rate's harmonics (75, 150, 225 Hz ... at 24 kHz), loudest
    where the signal itself is faint. Averaging the error's frames sample by sample keeps that
    pattern and cancels what does not repeat."""
    frames = x.shape[-1] // hop
    err = (x_hat - x)[..., : frames * hop]
    return err.reshape(*err.shape[:-1], frames, hop).mean(-2).pow(2).mean()


def erb_filterbank(sample_rate: int, n_fft: int, n_bands: int = 21, f_min: float = 50.0,
                   f_max: float = 8000.0) -> Tensor:
    """Power responses [n_bands, n_fft // 2 + 1] of 4th-order gammatone filters, ERB-spaced in
    [f_min, f_max] (ViSQOL's speech-mode analysis: 21 bands, 50 Hz to 8 kHz)."""
    def erbs(f: Tensor) -> Tensor:
        return 21.4 * torch.log10(1.0 + 0.00437 * f)

    def from_erbs(e: Tensor) -> Tensor:
        return (10 ** (e / 21.4) - 1.0) / 0.00437

    centres = from_erbs(torch.linspace(float(erbs(torch.tensor(f_min))), float(erbs(torch.tensor(f_max))), n_bands))
    width = 1.019 * 24.7 * (4.37 * centres / 1000 + 1)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    return (1 + ((freqs[None] - centres[:, None]) / width[:, None]) ** 2) ** -4


class SpectralNsimLoss(nn.Module):
    """1 - NSIM between gammatone-like spectrograms in dB, as ViSQOL compares them (speech mode).

    Band levels (21 ERB bands, 50 Hz to 8 kHz, 80 ms Hann windows, hop 20 ms) in ViSQOL's dB
    (10 log10 of the RMS), floored at -45 dB and 45 dB below each frame's peak, shifted to a 0 dB
    minimum; then the similarity map of 3 x 3 Gaussian neighbourhoods, the product of a level term
    and a structure term (the local correlation), averaged. Reconstruction losses reward the mean of
    what the codes leave uncertain, which in dB is flat; this rewards the local up-and-down of the
    levels between neighbouring bands and frames, what ViSQOL scores."""

    KERNEL = ((0.0113033910173052, 0.0838251475442633, 0.0113033910173052),
              (0.0838251475442633, 0.619485845753726, 0.0838251475442633),
              (0.0113033910173052, 0.0838251475442633, 0.0113033910173052))
    C1, C3 = 1e-4, 4.5e-4

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        self.win, self.hop = round(0.08 * sample_rate), round(0.02 * sample_rate)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("fb", erb_filterbank(sample_rate, self.n_fft), persistent=False)
        self.register_buffer("kernel", torch.tensor(self.KERNEL)[None, None], persistent=False)

    def levels(self, x: Tensor) -> Tensor:
        """[B, C, T] -> band levels in ViSQOL's dB, [B * C, bands, frames]."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[-1] < self.win:
            flat = F.pad(flat, (0, self.win - flat.shape[-1]))
        spec = torch.stft(flat, self.n_fft, self.hop, win_length=self.win, window=self.window, center=False,
                          return_complex=True)
        power = torch.matmul(self.fb, spec.real ** 2 + spec.imag ** 2) * (2.0 / (self.win * self.n_fft))
        return 5.0 * torch.log10(power + 1e-12)

    def similarity(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """The mean NSIM per item [B * C]."""
        a, b = self.levels(x_hat), self.levels(x)
        floor = (torch.maximum(a.amax(1, keepdim=True), b.amax(1, keepdim=True)) - 45.0).clamp(min=-45.0).detach()
        a, b = torch.maximum(a, floor), torch.maximum(b, floor)
        low = torch.minimum(a.amin((1, 2), keepdim=True), b.amin((1, 2), keepdim=True)).detach()
        a, b = (a - low)[:, None], (b - low)[:, None]

        def smooth(t: Tensor) -> Tensor:
            return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), self.kernel)

        mu_a, mu_b = smooth(a), smooth(b)
        var_a = (smooth(a * a) - mu_a ** 2).clamp(min=0)
        var_b = (smooth(b * b) - mu_b ** 2).clamp(min=0)
        cov = smooth(a * b) - mu_a * mu_b
        level = (2 * mu_a * mu_b + self.C1) / (mu_a ** 2 + mu_b ** 2 + self.C1)
        structure = (cov + self.C3) / (torch.sqrt(var_a + 1e-8) * torch.sqrt(var_b + 1e-8) + self.C3)
        return (level * structure).mean((1, 2, 3))

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        return 1.0 - self.similarity(x_hat, x).mean()


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

    Monitor `metrics` (ratio_*: each loss's share of the raw gradient norms, before rescaling; after
    it, the shares are the weights' by construction).
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
