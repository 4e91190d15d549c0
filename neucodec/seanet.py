"""SEANet encoder and decoder (convolutions + LSTM), one-pass and streaming."""
from __future__ import annotations

import dataclasses
import typing as tp

import torch
from torch import nn

from .config import SEANetConfig
from .layers import SLSTM, ConvState, ConvTrState, LSTMState, SConv1d, SConvTranspose1d

Tensor = torch.Tensor
LayerState = tp.Union[ConvState, ConvTrState, LSTMState, "ResBlockState", None]


@dataclasses.dataclass
class ResBlockState:
    """State of the block's k-tap conv; its 1x1 convs and shortcut hold no samples back."""

    conv: ConvState | None


@dataclasses.dataclass
class SEANetState:
    """Streaming state of a whole encoder or decoder: one entry per layer, plus input held back
    until the first chunk is long enough for every layer's left padding."""

    layers: list[LayerState]
    pending: Tensor | None


class ResBlock(nn.Module):
    """ELU -> conv(k, C -> C/compress) -> ELU -> conv(1, -> C), plus a 1x1-conv (or identity) shortcut."""

    def __init__(self, dim: int, cfg: SEANetConfig, dilation: int) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        conv = dict(causal=cfg.causal, norm=cfg.norm, pad_mode=cfg.pad_mode)
        self.block = nn.Sequential(
            nn.ELU(), SConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **conv),
            nn.ELU(), SConv1d(hidden, dim, 1, **conv))
        self.shortcut: nn.Module = nn.Identity() if cfg.true_skip else SConv1d(dim, dim, 1, **conv)

    def forward(self, x: Tensor) -> Tensor:
        return self._output(x, self.block[:3](x))

    def stream(self, x: Tensor, state: ResBlockState | None, final: bool) -> tuple[Tensor, ResBlockState]:
        elu, conv, elu2 = self.block[:3]
        h, conv_state = conv.stream(elu(x), None if state is None else state.conv, final)
        return self._output(x, elu2(h)), ResBlockState(conv_state)

    def _output(self, x: Tensor, h: Tensor) -> Tensor:
        """shortcut(x) + conv1x1(h), h being the block before its last conv (same length as x).

        Two plain 1x1 convs (no norm after them) run as two accumulating matrix products on the
        time-major rows, (b_last + b_short) + h W_last^T + x W_short^T: one pass over the output
        instead of three.
        """
        last = self.block[3]
        if isinstance(self.shortcut, SConv1d) and last.is_plain_1x1() and self.shortcut.is_plain_1x1():
            w_last, b_last = last.weight_matrix()
            w_short, b_short = self.shortcut.weight_matrix()
            rows = x.mT.reshape(-1, x.shape[1])  # [B * T, C], a view for time-major input
            out = torch.addmm(b_last + b_short, h.mT.reshape(-1, h.shape[1]), w_last.t())
            out.addmm_(rows.to(out.dtype), w_short.t().to(out.dtype))  # under autocast, out is bf16/fp16
            return out.view(x.shape[0], x.shape[2], -1).mT
        return self.shortcut(x) + last(h)


class _SEANet(nn.Module):
    model: nn.Sequential
    min_first_chunk: int

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def stream(self, x: Tensor, state: SEANetState | None, final: bool = False) -> tuple[Tensor, SEANetState]:
        """Process the next chunk `x`; `final=True` flushes the end of the signal."""
        state = state or SEANetState([None] * len(self.model), None)
        if state.pending is not None:
            x = torch.cat([state.pending, x], dim=-1)
        if state.layers[0] is None and not final and x.shape[-1] < self.min_first_chunk:
            return x[..., :0].new_zeros(x.shape[0], 0, 0), SEANetState(state.layers, x)
        layers: list[LayerState] = []
        for layer, layer_state in zip(self.model, state.layers):
            if isinstance(layer, (SConv1d, SConvTranspose1d, ResBlock)):
                x, new = layer.stream(x, layer_state, final)  # type: ignore[arg-type]
            elif isinstance(layer, SLSTM):
                x, new = layer.stream(x, layer_state)  # type: ignore[arg-type]
            else:
                x, new = layer(x), None
            layers.append(new)
        # a non-None marker on layer 0 records that streaming has started
        return x, SEANetState(layers, None)


class SEANetEncoder(_SEANet):
    """Audio [B, C, T] -> latent [B, D, ceil(T / hop)]. Strides are the ratios reversed."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        conv = dict(causal=cfg.causal, norm=cfg.norm, pad_mode=cfg.pad_mode)
        mult = 1
        layers: list[nn.Module] = [SConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, **conv)]
        for ratio in reversed(cfg.ratios):
            width = mult * cfg.n_filters
            layers += [ResBlock(width, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
            layers += [nn.ELU(), SConv1d(width, width * 2, ratio * 2, stride=ratio, **conv)]
            mult *= 2
        if cfg.lstm:
            layers.append(SLSTM(mult * cfg.n_filters, cfg.lstm))
        layers += [nn.ELU(), SConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size, **conv)]
        self.model = nn.Sequential(*layers)
        self.min_first_chunk = 8 * cfg.hop_length


class SEANetDecoder(_SEANet):
    """Latent [B, D, F] -> audio [B, C, F * hop]."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        conv = dict(causal=cfg.causal, norm=cfg.norm, pad_mode=cfg.pad_mode)
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [SConv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, **conv)]
        if cfg.lstm:
            layers.append(SLSTM(mult * cfg.n_filters, cfg.lstm))
        for ratio in cfg.ratios:
            width = mult * cfg.n_filters
            layers += [nn.ELU(), SConvTranspose1d(width, width // 2, ratio * 2, stride=ratio,
                                                  causal=cfg.causal, norm=cfg.norm)]
            layers += [ResBlock(width // 2, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
            mult //= 2
        layers += [nn.ELU(), SConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, **conv)]
        self.model = nn.Sequential(*layers)
        self.min_first_chunk = 8
