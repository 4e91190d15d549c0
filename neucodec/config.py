"""Frozen configuration dataclasses for the codec and the entropy-coding LM, and their JSON form."""
from __future__ import annotations

import dataclasses
import json
import math
import typing as tp
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class SEANetConfig:
    """SEANet encoder/decoder hyperparameters (defaults: the released EnCodec models)."""

    channels: int = 1
    dimension: int = 128
    n_filters: int = 32
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 5, 4, 2)
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    causal: bool = True
    norm: str = "weight_norm"  # "weight_norm" | "time_group_norm" | "none"
    pad_mode: str = "reflect"
    true_skip: bool = False
    compress: int = 2
    lstm: int = 2

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


@dataclasses.dataclass(frozen=True)
class RVQConfig:
    """Residual vector quantizer: `n_q` codebooks of `bins` entries of size `dimension`."""

    dimension: int = 128
    n_q: int = 32
    bins: int = 1024
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 50
    threshold_ema_dead_code: float = 2.0


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """A whole codec: sample rate, channels, networks, quantizer, bandwidths and segmenting."""

    name: str = "encodec_24khz"
    sample_rate: int = 24000
    channels: int = 1
    seanet: SEANetConfig = SEANetConfig()
    quantizer: RVQConfig = RVQConfig()
    bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    segment: float | None = None  # seconds; None = the whole signal in one pass
    overlap: float = 0.01
    normalize: bool = False

    @property
    def hop_length(self) -> int:
        return self.seanet.hop_length

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def segment_length(self) -> int | None:
        return None if self.segment is None else int(self.segment * self.sample_rate)

    @property
    def segment_stride(self) -> int | None:
        length = self.segment_length
        return None if length is None else max(1, int((1 - self.overlap) * length))

    def n_q_for_bandwidth(self, bandwidth: float | None) -> int:
        """Codebooks for `bandwidth` kbps: floor(bw * 1000 / (bits per codebook * frame rate)),
        at least 1 and at most the quantizer's `n_q`."""
        if bandwidth is None or bandwidth <= 0:
            return self.quantizer.n_q
        bits_per_q = math.log2(self.quantizer.bins) * self.frame_rate
        return min(self.quantizer.n_q, int(max(1, math.floor(bandwidth * 1000 / bits_per_q))))


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Entropy-coding transformer: predicts the `n_q` codes of step t from those of step t-1."""

    n_q: int = 32
    card: int = 1024
    dim: int = 200
    num_layers: int = 5
    num_heads: int = 8
    hidden_scale: int = 4
    past_context: int = 262
    max_period: float = 10000.0
    tie_embeddings: bool = False  # heads reuse the embedding tables (smaller; not the official layout)


def encodec_24khz() -> CodecConfig:
    """The released causal 24 kHz mono model."""
    return CodecConfig()


def encodec_48khz() -> CodecConfig:
    """The released non-causal 48 kHz stereo model with 1 s normalised segments."""
    return CodecConfig(
        name="encodec_48khz", sample_rate=48000, channels=2,
        seanet=SEANetConfig(channels=2, causal=False, norm="time_group_norm"),
        quantizer=RVQConfig(n_q=16), bandwidths=(3.0, 6.0, 12.0, 24.0),
        segment=1.0, normalize=True)


def lm_for(codec: CodecConfig, **overrides: tp.Any) -> LMConfig:
    """The LM configuration the reference builds for a codec (3.5 s of past context)."""
    base = LMConfig(n_q=codec.quantizer.n_q, card=codec.quantizer.bins,
                    past_context=int(3.5 * codec.frame_rate))
    return dataclasses.replace(base, **overrides)


OFFICIAL: dict[str, tp.Callable[[], CodecConfig]] = {
    "encodec_24khz": encodec_24khz,
    "encodec_48khz": encodec_48khz,
}


def to_dict(config: tp.Any) -> dict[str, tp.Any]:
    """A JSON-ready dict of a config dataclass (nested ones included)."""
    return dataclasses.asdict(config)


def codec_from_dict(data: dict[str, tp.Any]) -> CodecConfig:
    """Inverse of `to_dict` for a `CodecConfig`; unknown keys are an error."""
    data = dict(data)
    seanet = dict(data.pop("seanet", {}))
    if "ratios" in seanet:
        seanet["ratios"] = tuple(seanet["ratios"])
    quantizer = data.pop("quantizer", {})
    if "bandwidths" in data:
        data["bandwidths"] = tuple(float(b) for b in data["bandwidths"])
    return CodecConfig(seanet=SEANetConfig(**seanet), quantizer=RVQConfig(**quantizer), **data)


def lm_from_dict(data: dict[str, tp.Any]) -> LMConfig:
    return LMConfig(**data)


def save_json(config: tp.Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")
