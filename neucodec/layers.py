"""Convolutions with EnCodec's exact padding rule and norms, the LSTM block, and their streaming state.

Every layer has a one-pass `forward` and, for causal layers, a `stream(x, state, final)` that
processes a long signal chunk by chunk and returns the same output (up to float rounding) with
memory bounded by the chunk. States are explicit dataclasses; `None` means "nothing seen yet".

Layout: activations are [B, C, T] tensors stored time-major (memory [B, T, C], i.e. `x.mT` is
contiguous). The convolutions run as 2-D convolutions in torch's channels-last format, which
oneDNN computes without reordering the activations before and after every layer: 1.2-2x faster
per convolution on CPU, forward and backward, than [B, C, T]-contiguous conv1d. Padding and
concatenation happen on the time-major view, so every layer hands the next one this layout;
other layouts are accepted and converted once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def extra_padding_for_conv1d(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """Right padding that makes the last window full: ideal length minus actual length.

    Integer form of the reference rule (which divides in floats): the number of windows is
    ceil((length - kernel_size + padding_total) / stride) + 1.
    """
    windows_minus_one = -(-(length - kernel_size + padding_total) // stride)
    ideal_length = windows_minus_one * stride + kernel_size - padding_total
    return ideal_length - length


def time_major(x: Tensor) -> Tensor:
    """[B, C, T] with memory [B, T, C] (the layout every layer hands on); copies only if needed."""
    return x if x.mT.is_contiguous() else x.mT.contiguous().mT


def cat_time(pieces: list[Tensor]) -> Tensor:
    """Concatenate [B, C, t] pieces along time into a time-major [B, C, sum t]."""
    return torch.cat([p.mT for p in pieces], dim=1).mT


def pad1d(x: Tensor, paddings: tuple[int, int], mode: str = "constant") -> Tensor:
    """Pad the time axis of [B, C, T] (zeros or reflection; reflection of inputs shorter than the
    pad zero-extends them first, as the reference does). The result is time-major."""
    left, right = paddings
    if mode == "reflect":
        length = x.shape[-1]
        max_pad = max(left, right)
        extra = 0
        if length <= max_pad:
            extra = max_pad - length + 1
            x = pad1d(x, (0, extra))
        padded = reflect_pad1d(x, paddings)
        return padded[..., : padded.shape[-1] - extra]
    if mode not in ("constant", "zero"):
        raise ValueError(f"unknown pad mode {mode!r}; use 'reflect' or 'constant'")
    if not left and not right:
        return time_major(x)
    return F.pad(x.mT, (0, 0, left, right)).mT


def reflect_pad1d(x: Tensor, paddings: tuple[int, int]) -> Tensor:
    """`F.pad(x, paddings, "reflect")` (needs pads < length), written as one concatenation of
    mirrored edge slices: the same values, about 5x faster than torch's CPU reflection kernel."""
    left, right = paddings
    pieces = [x[..., 1: left + 1].flip(-1), x] if left else [x]
    if right:
        pieces.append(x[..., -right - 1: -1].flip(-1))
    return cat_time(pieces) if len(pieces) > 1 else time_major(x)


def unpad1d(x: Tensor, paddings: tuple[int, int]) -> Tensor:
    left, right = paddings
    return x[..., left: x.shape[-1] - right]


# ---------------------------------------------------------------- weight norm (state_dict compatible)

def _apply_weight_norm(conv: nn.Module) -> None:
    """Replace `weight` by `weight_g` (norm over all dims but 0) and `weight_v`, as the old
    `torch.nn.utils.weight_norm(dim=0)` did, so the official checkpoint keys load as they are."""
    weight = conv.weight.detach()
    del conv._parameters["weight"]
    conv.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, 0))
    conv.weight_v = nn.Parameter(weight.clone())


def effective_weight(conv: nn.Module) -> Tensor:
    if "weight" in conv._parameters:
        return conv._parameters["weight"]
    return torch._weight_norm(conv.weight_v, conv.weight_g, 0)


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Compute g * v / |v| once and keep it as a plain `weight` (for inference; changes keys)."""
    for sub in module.modules():
        if "weight_g" in sub._parameters:
            weight = effective_weight(sub).detach()
            del sub._parameters["weight_g"], sub._parameters["weight_v"]
            sub._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return module


def _as_2d(x: Tensor) -> Tensor:
    """[B, C, T] -> [B, C, 1, T] in channels-last format (a view when `x` is time-major)."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


class _Conv1d(nn.Conv1d):
    """Conv1d computed as a channels-last 2-D convolution (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(_as_2d(x), _as_2d(effective_weight(self)), self.bias, (1, self.stride[0]),
                     0, (1, self.dilation[0]), self.groups)
        return y.squeeze(2)


class _ConvTranspose1d(nn.ConvTranspose1d):
    def forward(self, x: Tensor, bias: bool = True) -> Tensor:  # type: ignore[override]
        y = F.conv_transpose2d(_as_2d(x), _as_2d(effective_weight(self)), self.bias if bias else None,
                               (1, self.stride[0]), 0, 0, self.groups, 1)
        return y.squeeze(2)


class _TimeGroupNorm(nn.GroupNorm):
    """GroupNorm over [B, C, T], run in channels-last 2-D form so time-major input is not copied."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_as_2d(x)).squeeze(2)


def _norm_module(norm: str, channels: int) -> nn.Module:
    if norm == "time_group_norm":
        return _TimeGroupNorm(1, channels)
    if norm in ("weight_norm", "none"):
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; use 'weight_norm', 'time_group_norm' or 'none'")


class NormConv1d(nn.Module):
    """Conv1d (`.conv`) followed by its norm (`.norm`): the official `conv.conv` / `conv.norm` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, norm: str = "none") -> None:
        super().__init__()
        self.conv = _Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        if norm == "weight_norm":
            _apply_weight_norm(self.conv)
        self.norm = _norm_module(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """ConvTranspose1d (`.convtr`) followed by its norm (`.norm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: str = "none") -> None:
        super().__init__()
        self.convtr = _ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        if norm == "weight_norm":
            _apply_weight_norm(self.convtr)
        self.norm = _norm_module(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.convtr(x))


# ---------------------------------------------------------------- streaming states

@dataclasses.dataclass
class ConvState:
    """Input samples a causal conv has received but not yet consumed (left-padded once started)."""

    buffer: Tensor
    started: bool


@dataclasses.dataclass
class ConvTrState:
    """Partial output of a causal transposed conv still waiting for the next frame's overlap."""

    tail: Tensor


@dataclasses.dataclass
class LSTMState:
    h: Tensor
    c: Tensor


# ---------------------------------------------------------------- layers

class SConv1d(nn.Module):
    """Conv1d with EnCodec's padding: causal (all left) or centred, plus the extra right pad."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, causal: bool = False, norm: str = "none",
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation, norm)
        self.causal = causal
        self.pad_mode = pad_mode
        self.stride = stride
        self.kernel_size = (kernel_size - 1) * dilation + 1
        self.padding_total = self.kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        extra = extra_padding_for_conv1d(x.shape[-1], self.kernel_size, self.stride, self.padding_total)
        if self.causal:
            x = pad1d(x, (self.padding_total, extra), self.pad_mode)
        else:
            right = self.padding_total // 2
            x = pad1d(x, (self.padding_total - right, right + extra), self.pad_mode)
        return self.conv(x)

    def is_plain_1x1(self) -> bool:
        """A pointwise conv (kernel 1, stride 1) with a bias and no norm after it: a matrix product."""
        conv = self.conv.conv
        return self.kernel_size == 1 and self.stride == 1 and conv.bias is not None \
            and isinstance(self.conv.norm, nn.Identity)

    def weight_matrix(self) -> tuple[Tensor, Tensor]:
        """(weight [out, in], bias [out]) of a pointwise conv."""
        return effective_weight(self.conv.conv)[..., 0], self.conv.conv.bias

    def stream(self, x: Tensor, state: ConvState | None, final: bool) -> tuple[Tensor, ConvState]:
        """Causal chunked forward: windows are computed as soon as they are complete."""
        assert self.causal, "only causal convolutions can stream"
        buffer = x if state is None or state.buffer.shape[-1] == 0 else cat_time([state.buffer, x])
        started = state is not None and state.started
        if not started:
            if final:  # the whole signal fits in what we hold: exactly the one-pass rule
                return self.forward(buffer), ConvState(buffer[..., :0], True)
            if buffer.shape[-1] <= self.padding_total:
                return buffer[..., :0].new_zeros(*buffer.shape[:-2], self.conv.conv.out_channels, 0), \
                    ConvState(buffer, False)
            buffer = pad1d(buffer, (self.padding_total, 0), self.pad_mode)
        if final:
            extra = extra_padding_for_conv1d(buffer.shape[-1] - self.padding_total, self.kernel_size,
                                             self.stride, self.padding_total)
            buffer = pad1d(buffer, (0, extra), self.pad_mode)
        windows = max(0, (buffer.shape[-1] - self.kernel_size) // self.stride + 1)
        used = (windows - 1) * self.stride + self.kernel_size if windows else 0
        y = self.conv(buffer[..., :used]) if windows else \
            buffer.new_zeros(buffer.shape[0], self.conv.conv.out_channels, 0)
        # clone: a view of the few held-back samples would keep the whole chunk's buffer alive
        return y, ConvState(buffer[..., windows * self.stride:].clone(), True)


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims k - stride samples: all on the right if causal, else centred."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none") -> None:
        super().__init__()
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, norm)
        self.causal = causal
        self.stride = stride
        self.padding_total = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        y = self.convtr(x)
        right = self.padding_total if self.causal else self.padding_total // 2
        return unpad1d(y, (self.padding_total - right, right))

    def stream(self, x: Tensor, state: ConvTrState | None, final: bool) -> tuple[Tensor, ConvTrState]:
        """Causal chunked forward: emits `stride` samples per input frame, keeps the overlap tail."""
        assert self.causal and isinstance(self.convtr.norm, nn.Identity), "only causal, norm-free convtr streams"
        conv = self.convtr.convtr
        if x.shape[-1] == 0:
            y = x.new_zeros(x.shape[0], conv.out_channels, self.padding_total)
        else:
            y = conv(x, bias=False)
        if state is not None:
            y[..., : self.padding_total] += state.tail
        emitted = y.shape[-1] - self.padding_total
        out = y[..., :emitted]
        if conv.bias is not None:
            out = out + conv.bias[:, None]
        return out, ConvTrState(y[..., emitted:].clone())  # clone: don't keep all of y alive


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> tp.Iterator[None]:
    """Run the enclosed ops on one intra-op thread (if `enabled`), then restore the thread count.

    For work made of many small ops, such as the LSTM, whose time steps are small matrix products
    ([B, 512] x [512, 2048]) that would each end in a thread barrier. On 2 cores shared with other
    work those barriers, not the arithmetic, dominated: at 2 threads the LSTM took ~70 % of a
    24 kHz encode (batch 1), 10x its single-thread cost, and ~50 % of a 48 kHz encode (batch of
    10 segments); at batch 60 one thread was still faster (1.9 s against 2.9 s for 150 steps).
    """
    threads = torch.get_num_threads()
    if threads == 1 or not enabled:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SLSTM(nn.Module):
    """Multi-layer LSTM over [B, C, T] in time-major layout, with a residual skip."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.stream(x, None)
        return y

    def stream(self, x: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState | None]:
        if x.shape[-1] == 0:
            return x, state
        xt = x.permute(2, 0, 1)  # [T, B, C]
        with one_thread():  # a barrier per time step would cost more than the step (see one_thread)
            y, (h, c) = self.lstm(xt, None if state is None else (state.h, state.c))
        if self.skip:
            y = y + xt
        return y.transpose(0, 1).contiguous().permute(0, 2, 1), LSTMState(h, c)
