"""Multi-scale STFT discriminator (paper §3.4): 2-D convs over complex spectrograms at 5 scales."""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

Tensor = torch.Tensor


class STFTDiscriminator(nn.Module):
    """One scale: complex STFT (real, imag as channels) -> conv stack -> logits and feature maps.

    Conv (3, 9) -> 3 convs (3, 9) with time dilations 1, 2, 4 and frequency stride 2 -> conv 3x3
    -> 1-channel 3x3 output conv; LeakyReLU between, weight norm on all convs.
    """

    def __init__(self, channels: int, n_fft: int, filters: int = 32, dilations: tp.Sequence[int] = (1, 2, 4),
                 slope: float = 0.2) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        k = (3, 9)
        convs = [weight_norm(nn.Conv2d(2 * channels, filters, k, padding=(1, 4)))]
        for d in dilations:
            convs.append(weight_norm(nn.Conv2d(filters, filters, k, stride=(1, 2), dilation=(d, 1),
                                               padding=(d, 4))))
        convs.append(weight_norm(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        B, C, T = x.shape
        spec = torch.stft(x.reshape(B * C, T), self.n_fft, self.hop, window=self.window,
                          normalized=True, center=False, return_complex=True)
        z = torch.view_as_real(spec).view(B, C, *spec.shape[-2:], 2)  # [B, C, F, frames, 2]
        z = z.permute(0, 1, 4, 3, 2).reshape(B, C * 2, spec.shape[-1], spec.shape[-2])  # [B, 2C, time, freq]
        z = z.contiguous(memory_format=torch.channels_last)  # oneDNN's native layout: no reorders per conv
        fmaps = []
        for conv in self.convs:
            z = self.act(conv(z))
            fmaps.append(z)
        return self.post(z), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """Five STFT discriminators with windows 2048, 1024, 512, 256, 128 (doubled at 48 kHz)."""

    def __init__(self, channels: int = 1, filters: int = 32,
                 n_ffts: tp.Sequence[int] = (2048, 1024, 512, 256, 128)) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList([STFTDiscriminator(channels, n, filters) for n in n_ffts])

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        logits, fmaps = [], []
        for d in self.discriminators:
            lg, fm = d(x)
            logits.append(lg)
            fmaps.append(fm)
        return logits, fmaps
