"""The codec: audio [B, C, T] <-> codes [B, K, frames] (+ per-segment scales), one pass or chunked.

No file I/O here. The causal model encodes long inputs chunk by chunk with its streaming state, so
memory does not grow with length; the segmented (48 kHz) model batches its independent segments.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import torch
from torch import nn

from .config import CodecConfig
from .engine import Call, alone
from .errors import UnsupportedAudio, UnsupportedSetting
from .layers import fold_weight_norm
from .layout import Segment, num_frames, segment_layout  # noqa: F401 - re-exported: the codec's segments
from .quantization import QuantizedResult, ResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder, SEANetState

Tensor = torch.Tensor

#: Streaming steps, in frames: a stream goes through the model in steps of STEP_FRAMES (6.8 s at
#: 24 kHz), and its last STEP_FRAMES or fewer in halving steps down to TAIL_FRAMES, however its input
#: was cut (see `steps`). Smaller steps cost a CPU shared with other work dearly: every operation is
#: a parallel region whose barrier waits for a descheduled thread (128-frame steps made an 8 s encode
#: 10x slower beside a training run than 512-frame ones).
STEP_FRAMES = 512
TAIL_FRAMES = 32
#: Segments (of a segmented model) per encoder/decoder call on a CPU; see `_cpu_groups`.
SEGMENT_BATCH = 4


@dataclasses.dataclass
class EncodedAudio:
    """Codes of a batch of signals.

    codes: [B, K, frames] int64; segments are concatenated along frames.
    scales: [B, S] float32 per-segment volume for normalising models, else None.
    length: samples per channel of the original signal.
    """

    codes: Tensor
    scales: Tensor | None
    length: int


class Codec(nn.Module):
    """SEANet encoder + residual vector quantizer + SEANet decoder, configured by `CodecConfig`."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SEANetEncoder(config.seanet)
        self.decoder = SEANetDecoder(config.seanet)
        self.quantizer = ResidualVectorQuantizer(config.quantizer)
        self._package_bandwidth: float | None = None

    # ------------------------------------------------------------- properties
    @property
    def default_bandwidth(self) -> float:
        """The codes' bandwidth (kbps) when none is asked for, in `encode` as in `pipeline.encode_file` and
        the command line: the release package's (`hub.load_codec` sets it), else 6 kbps where the model
        offers it, else its lowest."""
        bws = self.config.bandwidths
        return getattr(self, "_package_bandwidth", None) or (6.0 if 6.0 in bws else min(bws))

    @default_bandwidth.setter
    def default_bandwidth(self, value: float | None) -> None:
        if value is not None:
            self.n_q_for_bandwidth(value)  # one of the model's bandwidths
        self._package_bandwidth = None if value is None else float(value)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def n_q(self) -> int:
        return self.config.quantizer.n_q

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def n_q_for_bandwidth(self, bandwidth: float | None) -> int:
        if bandwidth is not None and bandwidth not in self.config.bandwidths:
            supported = ", ".join(f"{b:g}" for b in self.config.bandwidths)
            raise UnsupportedSetting(f"{self.config.name} does not support {bandwidth:g} kbps; use one of {supported}")
        return self.config.n_q_for_bandwidth(bandwidth)

    def prepare_for_inference(self) -> Codec:
        """eval(), no gradients, weight norm folded into plain weights (faster; keys change)."""
        self.eval()
        fold_weight_norm(self)
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # ------------------------------------------------------------- segments
    def segments(self, length: int) -> list[Segment]:
        """Segment layout of a signal: one segment, or fixed segments with 1 % overlap."""
        return segment_layout(length, self.hop_length, self.config.segment_length, self.config.segment_stride)

    def check_audio(self, wav: Tensor) -> None:
        if not isinstance(wav, Tensor) or wav.dim() != 3:
            shape = tuple(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
            raise UnsupportedAudio(f"expected audio of shape [batch, channels, samples], got {shape}; "
                                   "add dimensions with wav[None] or wav.view(1, C, T)")
        if wav.shape[1] != self.channels:
            raise UnsupportedAudio(f"{self.config.name} takes {self.channels} channel(s), got {wav.shape[1]}; "
                                   "downmix or duplicate channels first (neucodec.audio_io.convert)")
        if wav.shape[-1] == 0:
            raise UnsupportedAudio("audio is empty (0 samples)")
        if not wav.is_floating_point():
            raise UnsupportedAudio(f"expected float audio in [-1, 1], got {wav.dtype}; "
                                   "convert with wav.float() / 32768")

    # ------------------------------------------------------------- one segment
    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.config.normalize:
            return x, None
        mono = x.mean(dim=1, keepdim=True)
        scale = 1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt()
        return x / scale, scale.view(-1)

    def _encode_segments(self, x: Tensor, n_q: int) -> tuple[Tensor, Tensor | None]:
        """Same-length segments [N, C, L] -> codes [N, K, F], scales [N] or None."""
        x, scale = self._normalize(x)
        codes = [self.quantizer.encode(self.encoder(part), n_q) for part in _cpu_groups(x)]
        return torch.cat(codes), scale

    def _decode_segments(self, codes: Tensor, scale: Tensor | None) -> Tensor:
        out = torch.cat([self.decoder(self.quantizer.decode(part)) for part in _cpu_groups(codes)])
        return out if scale is None else out * scale.view(-1, 1, 1)

    # ------------------------------------------------------------- public API
    @torch.no_grad()
    def encode(self, wav: Tensor, bandwidth: float | None | tp.Literal["default"] = "default",
               chunk_seconds: float | None = 10.0) -> EncodedAudio:
        """Audio [B, C, T] -> codes [B, K, ceil(T / hop) per segment].

        `bandwidth` (kbps) picks K: one of the model's bandwidths; "default" (when not given) is
        `default_bandwidth`, as in `encode_file` and the command line; None is every codebook. A causal
        model processes inputs longer than `chunk_seconds` chunk by chunk with its streaming state
        (bounded memory; codes equal to a one-pass encode up to float rounding); None forces one pass.
        """
        self.check_audio(wav)
        n_q = self.n_q_for_bandwidth(self.default_bandwidth if bandwidth == "default" else bandwidth)
        B, C, T = wav.shape
        segs = self.segments(T)
        if len(segs) == 1:
            chunk = None if chunk_seconds is None else int(chunk_seconds * self.sample_rate)
            if self.config.seanet.causal and chunk is not None and T > chunk:
                codes = torch.cat(list(self.encode_stream(wav.split(chunk, dim=-1), n_q)), dim=-1)
                return EncodedAudio(codes, None, T)
            codes, scale = self._encode_segments(wav, n_q)
            return EncodedAudio(codes, None if scale is None else scale.view(B, 1), T)
        # full-length segments go through as one batch [B * S, C, L]; the shorter last one alone
        full = [s for s in segs if s.length == segs[0].length]
        rest = segs[len(full):]
        batch = torch.stack([wav[..., s.offset: s.offset + s.length] for s in full], dim=1)
        codes, scales = self._encode_segments(batch.flatten(0, 1), n_q)
        codes = codes.view(B, len(full), n_q, -1)
        all_codes = [codes[:, i] for i in range(len(full))]
        all_scales = [scales.view(B, len(full))] if scales is not None else []
        for s in rest:
            c, sc = self._encode_segments(wav[..., s.offset: s.offset + s.length], n_q)
            all_codes.append(c)
            if sc is not None:
                all_scales.append(sc.view(B, 1))
        return EncodedAudio(torch.cat(all_codes, dim=-1), torch.cat(all_scales, 1) if all_scales else None, T)

    @torch.no_grad()
    def decode(self, encoded: EncodedAudio, chunk_seconds: float | None = 10.0) -> Tensor:
        """Codes -> audio [B, C, length]; segments are recombined with triangular overlap-add.

        A causal model decodes more than `chunk_seconds` of codes chunk by chunk with its streaming
        state (activations stay small; output equal to one pass up to float rounding).
        """
        codes, length = encoded.codes, encoded.length
        segs = self.segments(length)
        expected = sum(s.frames for s in segs)
        if codes.dim() != 3 or codes.shape[-1] != expected:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit {length} samples: "
                             f"expected [B, K, {expected}]")
        if len(segs) == 1:
            scale = None if encoded.scales is None else encoded.scales[:, 0]
            chunk = None if chunk_seconds is None else max(1, int(chunk_seconds * self.frame_rate))
            if self.config.seanet.causal and scale is None and chunk is not None and codes.shape[-1] > chunk:
                return torch.cat(list(self.decode_stream(codes.split(chunk, dim=-1))), dim=-1)[..., :length]
            return self._decode_segments(codes, scale)[..., :length]
        assert encoded.scales is not None or not self.config.normalize
        B, K, _ = codes.shape
        full = [s for s in segs if s.length == segs[0].length]
        F0 = segs[0].frames
        batch = codes[..., : F0 * len(full)].view(B, K, len(full), F0).permute(0, 2, 1, 3).flatten(0, 1)
        scales = encoded.scales
        out = self._decode_segments(batch, None if scales is None else scales[:, : len(full)].flatten())
        frames = list(out.view(B, len(full), *out.shape[1:]).unbind(1))
        start = F0 * len(full)
        for i, s in enumerate(segs[len(full):]):
            sc = None if scales is None else scales[:, len(full) + i]
            frames.append(self._decode_segments(codes[..., start: start + s.frames], sc))
            start += s.frames
        return overlap_add(frames, self.config.segment_stride or 1)[..., :length]

    def encode_stream(self, chunks: tp.Iterable[Tensor], n_q: int) -> tp.Iterator[Tensor]:
        """Causal model: audio chunks [B, C, t] -> code chunks [B, K, f] as soon as frames complete."""
        return alone(self.encode_calls(chunks, n_q))

    def encode_calls(self, chunks: tp.Iterable[Tensor], n_q: int) -> tp.Iterator[Tensor | Call]:
        """`encode_stream` with its steps as calls (`neucodec.engine`)."""
        if not self.config.seanet.causal:
            raise ValueError(f"{self.config.name} is not causal and cannot stream; use encode()")
        state: SEANetState | None = None
        for chunk, final in steps(chunks, STEP_FRAMES * self.hop_length, TAIL_FRAMES * self.hop_length):
            call = Call.stacked(self, "encode_step", (chunk, state, final, n_q),
                                chunk.shape[0] * chunk.shape[1] * chunk.shape[-1])
            yield call
            codes, state = call.result()
            if codes.shape[-1]:
                yield codes

    def encode_step(self, chunk: Tensor, state: SEANetState | None, final: bool,
                    n_q: int) -> tuple[Tensor, SEANetState]:
        """One step of `encode_stream`: audio chunk [B, C, t] -> codes [B, K, f] of the frames it completes."""
        z, state = self.encoder.stream(chunk, state, final=final)
        if not z.shape[-1]:
            return torch.zeros(chunk.shape[0], n_q, 0, dtype=torch.long, device=chunk.device), state
        return self.quantizer.encode(z, n_q), state

    def decode_stream(self, chunks: tp.Iterable[Tensor]) -> tp.Iterator[Tensor]:
        """Causal model: code chunks [B, K, f] -> audio chunks [B, C, f * hop] (untrimmed)."""
        return alone(self.decode_calls(chunks))

    def decode_calls(self, chunks: tp.Iterable[Tensor | Call]) -> tp.Iterator[Tensor | Call]:
        """`decode_stream` with its steps as calls (`neucodec.engine`); the calls among `chunks` pass on."""
        if not self.config.seanet.causal:
            raise ValueError(f"{self.config.name} is not causal and cannot stream; use decode()")
        state: SEANetState | None = None
        for item in steps(chunks, STEP_FRAMES, TAIL_FRAMES):
            if isinstance(item, Call):
                yield item
                continue
            codes, final = item
            call = self.decode_step_call(codes, state, final)
            yield call
            y, state = call.result()
            if y.shape[-1]:
                yield y

    def decode_step(self, codes: Tensor, state: SEANetState | None, final: bool) -> tuple[Tensor, SEANetState]:
        """One step of `decode_stream`: codes [B, K, f] -> the audio [B, C, t] they complete."""
        return self.decoder.stream(self.quantizer.decode(codes), state, final=final)

    def decode_step_call(self, codes: Tensor, state: SEANetState | None, final: bool) -> Call:
        """`decode_step` as a call."""
        return Call.stacked(self, "decode_step", (codes, state, final),
                            codes.shape[0] * self.channels * codes.shape[-1] * self.hop_length)

    def encode_segments_call(self, x: Tensor, n_q: int) -> Call:
        """`_encode_segments` (segments [N, C, L]) as a call."""
        return Call.stacked(self, "_encode_segments", (x, n_q), x.shape[0] * x.shape[1] * x.shape[-1])

    def decode_segments_call(self, codes: Tensor, scale: Tensor | None) -> Call:
        """`_decode_segments` (codes [N, K, F]) as a call."""
        return Call.stacked(self, "_decode_segments", (codes, scale),
                            codes.shape[0] * self.channels * codes.shape[-1] * self.hop_length)

    def forward(self, wav: Tensor, n_q: int) -> tuple[Tensor, QuantizedResult]:
        """Training pass on equal-length items [B, C, T]: (reconstruction [B, C, T], quantizer result)."""
        z = self.encoder(wav)
        q = self.quantizer(z, n_q)
        return self.decoder(q.quantized)[..., : wav.shape[-1]], q


def _cpu_groups(x: Tensor) -> tuple[Tensor, ...]:
    """A batch of segments in groups of SEGMENT_BATCH on a CPU, whole elsewhere. On a 2-core CPU the
    activations of 10 one-second 48 kHz segments outgrow the caches: groups of 2 to 5 encoded and
    decoded 1.2-1.5x faster than the whole batch of 10 (and than one segment at a time)."""
    return x.split(SEGMENT_BATCH) if x.device.type == "cpu" else (x,)


def steps(chunks: tp.Iterable[Tensor | Call], size: int, tail: int) -> tp.Iterator[tuple[Tensor, bool] | Call]:
    """Re-cut a stream of [B, C, t] chunks into pieces of `size` along time, each with whether it is
    the stream's last; its last `size` or fewer samples go in pieces of size / 2, size / 4, ... (the
    largest that leaves something over, each at most once) down to `tail`, and a final piece of 1 to
    `tail`. Calls (`neucodec.engine`) among the chunks pass on as they come.

    The steps then depend only on the stream's length, not on how its input was cut (reading
    blocks, resampling, pipes), and all streams take steps of a few fixed sizes but for their short
    final one: this is what lets `neucodec.engine` batch the steps of files of any lengths.
    A stream of n samples takes about n / size + log2(size / tail) steps: few enough that a CPU
    does not lose time to the per-operation cost of many small steps.
    """
    held: list[Tensor] = []
    have = 0
    for chunk in chunks:
        if isinstance(chunk, Call):
            yield chunk
            continue
        held.append(chunk)
        have += chunk.shape[-1]
        if have > size:  # keep 1 to `size` samples back: the stream may end after them
            x = torch.cat(held, -1)
            n = (have - 1) // size * size
            for piece in x[..., :n].split(size, -1):
                yield piece, False
            held, have = [x[..., n:]], have - n
    if not have:
        return
    rest = torch.cat(held, -1)
    piece = size
    while piece > tail:
        piece //= 2
        if rest.shape[-1] > max(piece, tail):
            yield rest[..., :piece], False
            rest = rest[..., piece:]
    yield rest, True


def overlap_add(frames: list[Tensor], stride: int) -> Tensor:
    """Recombine overlapping decoded segments with triangular weights.

    Each segment i starts at i * stride. Its samples are weighted by a ramp that rises from ~0 at
    its edges to 0.5 in its middle (0.5 - |t - 0.5|, t in (0, 1) over the first segment's length;
    a shorter last segment uses the start of that ramp). The sum is divided by the summed weights,
    so where only one segment covers a sample it passes unchanged::

        seg 0: /‾‾‾‾‾‾‾‾\\
        seg 1:          /‾‾‾‾‾‾‾‾\\
    """
    ola = OverlapAdd(stride)
    return torch.cat([ola.add(frame, last=i == len(frames) - 1) for i, frame in enumerate(frames)], -1)


class OverlapAdd:
    """`overlap_add` one segment at a time: `add` returns the samples that no later segment
    overlaps, the ones before the next segment's start (with `last`: all that are left). The pieces
    joined are `overlap_add` of all the segments, bit for bit; memory holds one segment."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.index = 0  # segments added
        self.base = 0  # absolute position of out[..., 0]
        self.ramp: Tensor | None = None
        self.out: Tensor | None = None  # weighted sums of the samples not yet returned
        self.weight: Tensor | None = None  # their summed weights

    def add(self, frame: Tensor, last: bool = False) -> Tensor:
        """Add the next segment [..., n]; the samples now final [..., t]."""
        n = frame.shape[-1]
        if self.ramp is None:
            t = torch.linspace(0, 1, n + 2, device=frame.device, dtype=frame.dtype)[1:-1]
            self.ramp = 0.5 - (t - 0.5).abs()
        offset = self.index * self.stride - self.base
        if self.out is None or self.weight is None:
            self.out, self.weight = frame.new_zeros(*frame.shape[:-1], n), frame.new_zeros(n)
        need = offset + n
        if need > self.out.shape[-1]:
            self.out = torch.cat([self.out, self.out.new_zeros(*self.out.shape[:-1], need - self.out.shape[-1])], -1)
            self.weight = torch.cat([self.weight, self.weight.new_zeros(need - self.weight.shape[-1])])
        self.out[..., offset: offset + n] += self.ramp[:n] * frame
        self.weight[offset: offset + n] += self.ramp[:n]
        self.index += 1
        if last:
            done = self.out / self.weight
            self.out = self.weight = None
            return done
        end = self.index * self.stride - self.base  # samples before the next segment's start are final
        done = self.out[..., :end] / self.weight[:end]
        self.out, self.weight = self.out[..., end:].clone(), self.weight[end:].clone()
        self.base += end
        return done
