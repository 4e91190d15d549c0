"""The .ecdc stream API: `encode_stream`/`decode_stream` in bounded memory, `read_info`, and the in-memory
`encode_bytes`/`decode_bytes`.

The work is done by `neucodec.writer` and `neucodec.reader` (with `neucodec.v0reader` for the
files of the reference encodec tool and `neucodec.streamaudio` for the audio of decoded codes);
`neucodec.streamspec` holds what a header says, `neucodec.container` the bytes (docs/FORMAT.md).
"""
from __future__ import annotations

import io
import typing as tp

import torch

from .errors import UnsupportedAudio
from .identity import model_identity
from .lm import LanguageModel
from .model import Codec
from .reader import decode_stream, read_header, read_info
from .streamspec import EncodeSettings, EnvelopeSpec, StreamInfo, encode_settings, envelope_settings, use_envelope
from .writer import encode_stream

__all__ = ["EncodeSettings", "EnvelopeSpec", "StreamInfo", "decode_bytes", "decode_stream", "encode_bytes",
           "encode_settings", "encode_stream", "envelope_settings", "model_identity", "read_header", "read_info",
           "use_envelope"]


def encode_bytes(codec: Codec, wav: torch.Tensor, bandwidth: float | None, lm: LanguageModel | None = None,
                 **kw: tp.Any) -> bytes:
    """Whole signal [G, C, T] -> .ecdc bytes (keyword arguments go to `encode_stream`; `chunk_seconds`
    cuts the signal into chunks of that length, 10 s by default)."""
    if wav.dim() != 3:
        raise UnsupportedAudio(f"expected audio [groups, channels, samples], got {tuple(wav.shape)}")
    kw.setdefault("source_sample_rate", codec.sample_rate)
    kw.setdefault("source_channels", wav.shape[0] * wav.shape[1])
    chunk = int(kw.pop("chunk_seconds", 10.0) * codec.sample_rate)
    buf = io.BytesIO()
    encode_stream(buf, codec, wav.split(chunk, -1) if wav.shape[-1] else [], bandwidth=bandwidth, lm=lm, **kw)
    return buf.getvalue()


def decode_bytes(data: bytes, codec: Codec | None = None, lm: LanguageModel | None = None,
                 **kw: tp.Any) -> tuple[StreamInfo, torch.Tensor]:
    """.ecdc bytes -> (info, audio [G, C, length]) (keyword arguments go to `decode_stream`)."""
    info, chunks = decode_stream(io.BytesIO(data), codec, lm, **kw)
    parts = list(chunks)
    if not parts:
        return info, torch.zeros(info.groups, info.channels, 0)
    return info, torch.cat(parts, -1)
