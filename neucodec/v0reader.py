"""Version-0 .ecdc files of the reference encodec tool: their header, their packed or LM-coded codes, their audio.

A reference file is its prelude (`container.read_prelude`: magic b"ECDC", a JSON header with the
keys `m` model, `al` audio length, `nc` codebooks, `lm` LM flag) and then the codes: packed 10 bits
each (`neucodec.packing`) or, with `lm`, arithmetic-coded with the official LM (`neucodec.v0lm`);
the 48 kHz model's 1 s segments each begin with their volume scale (big-endian float32).
"""
from __future__ import annotations

import math
import os
import struct
import typing as tp

import torch

from . import container, v0lm
from .errors import CorruptStream, ModelMismatch, NeucodecError
from .identity import model_identity
from .lm import LanguageModel
from .model import Codec
from .packing import packed_size, unpack
from .probe import HOP, MODELS, v0_info  # noqa: F401 - HOP re-exported; the header is read without torch
from .streamaudio import SegmentCodes, audio, guard
from .streamspec import STREAM, StreamInfo

Tensor = torch.Tensor

CHUNK_FRAMES = 800  # frames decoded at once from a long stream: 800 * K * 10 bits is always whole bytes


def decode_v0(fi: tp.BinaryIO, prelude: container.Prelude, codec: Codec | None, lm: LanguageModel | None = None,
              lm_threads: int | None = None) -> tuple[StreamInfo, tp.Iterator[Tensor]]:
    """(info, audio chunks) of a reference file whose prelude has been read (`reader.decode_stream`)."""
    info = v0_info(prelude.header)
    threads = _threads(lm_threads) if info.coder is not None else 0
    if codec is None:
        from .hub import load_codec
        codec = load_codec(info.model_id)
    if (codec.sample_rate, codec.channels, codec.config.normalize) != MODELS[info.model_id] \
            or codec.hop_length != info.hop_length or codec.n_q < info.n_q:
        raise ModelMismatch(f"this reference file needs {info.model_id}; the given model is "
                            f"{getattr(codec, 'model_id', codec.config.name)}")
    if lm is not None and info.coder is not None:
        _check_lm(lm, info)
    length = tp.cast(int, info.length)
    if length == 0:
        return info, iter([])
    segments = _lm_codes(fi, prelude.size, info, lm, threads) if info.coder is not None else \
        _packed_codes(_Bytes(fi, prelude.size), info)
    return info, guard(audio(segments, codec, info, lambda: length))


class _Bytes:
    """Exact reads from a file, with the absolute offset of the next byte (for error messages)."""

    def __init__(self, fi: tp.BinaryIO, offset: int) -> None:
        self.fi = fi
        self.offset = offset

    def read(self, n: int, what: str) -> bytes:
        data = container.read_exactly(self.fi, n, f"{what} at byte {self.offset}")
        self.offset += n
        return data


def _packed_codes(source: _Bytes, info: StreamInfo) -> tp.Iterator[SegmentCodes]:
    """Codes of a reference file coded without the LM: one long stream (read in pieces of
    CHUNK_FRAMES), or 1 s segments after their scales."""
    length, K = tp.cast(int, info.length), info.n_q
    if info.layout == STREAM:
        frames = info.layout_of(length)[0].frames
        for start in range(0, frames, CHUNK_FRAMES):
            F = min(CHUNK_FRAMES, frames - start)
            nbytes = packed_size(1, K, F)
            data = source.read(nbytes, "segment 0")
            if F < CHUNK_FRAMES:  # last piece: the padding bits of the flush must be zero
                yield SegmentCodes(unpack(data, 1, K, F, where=f"segment 0 at byte {source.offset - nbytes}"),
                                   None, None)
            else:
                yield SegmentCodes(unpack(data, 1, K, F), None, None)
        return
    for i, seg in enumerate(info.layout_of(length)):
        scale = _scale(source.read(4, f"segment {i} scale"), i, source.offset - 4)
        data = source.read(packed_size(1, K, seg.frames), f"segment {i}")
        yield SegmentCodes(unpack(data, 1, K, seg.frames, where=f"segment {i}"), scale, None)


def _scale(data: bytes, i: int, offset: int) -> Tensor:
    (scale,) = struct.unpack("!f", data)
    if not math.isfinite(scale):
        raise CorruptStream(f"segment {i} at byte {offset}: invalid volume scale")
    return torch.tensor([scale])


def _threads(threads: int | None) -> int:
    """The torch thread count the writer's LM ran with: `threads`, else NEUCODEC_V0_LM_THREADS, else ours."""
    if threads is None:
        env = os.environ.get("NEUCODEC_V0_LM_THREADS", "").strip()
        if not env:
            return torch.get_num_threads()
        if not env.isdigit() or not 1 <= int(env) <= 1024:
            raise NeucodecError(f"NEUCODEC_V0_LM_THREADS={env[:20]!r}: expected a thread count from 1 to 1024")
        return int(env)
    if not 1 <= threads <= 1024:
        raise NeucodecError(f"v0_lm_threads={threads}: expected a thread count from 1 to 1024")
    return threads


def _check_lm(lm: LanguageModel, info: StreamInfo) -> None:
    """The LM must have the official layout the reference builds for the file's model."""
    c = lm.cfg
    past = int(3.5 * info.frame_rate)
    weight = lm.transformer.norm_in.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ModelMismatch(f"the LM must be on the CPU in float32 to decode reference files (got {weight.device}, "
                            f"{weight.dtype}); load it with neucodec.hub.load_lm")
    if c.card != 1024 or c.n_q < info.n_q or c.past_context != past or c.tie_embeddings:
        raise ModelMismatch(f"this reference file was entropy-coded with the official LM {info.lm_id} (past context "
                            f"{past}, {info.n_q} codebooks); the given LM is {model_identity(lm)[0]} (past context "
                            f"{c.past_context}, {c.n_q} codebooks)")


def _lm_codes(fi: tp.BinaryIO, start: int, info: StreamInfo, lm: LanguageModel | None,
              threads: int) -> tp.Iterator[SegmentCodes]:
    """Codes of a reference file coded with the LM: the stream in pieces of CHUNK_FRAMES, or 1 s
    segments after their scales."""
    if lm is None:
        from .hub import load_lm
        try:
            lm = load_lm(tp.cast(str, info.lm_id))
        except NeucodecError as e:
            raise type(e)(f"this reference file was entropy-coded with {info.lm_id}, which is needed to decode "
                          f"it: {e}") from None
        _check_lm(lm, info)
    length = tp.cast(int, info.length)
    stream = v0lm.ReferenceLM(lm, info.n_q)
    source = v0lm.ByteSource(fi, start)
    if info.layout == STREAM:
        frames = info.layout_of(length)[0].frames
        for piece in v0lm.decode_segment(source, stream, frames, "segment 0", threads, CHUNK_FRAMES):
            yield SegmentCodes(torch.from_numpy(piece)[None], None, None)
    else:
        for i, seg in enumerate(info.layout_of(length)):
            scale = _scale(source.read(4, f"segment {i} scale"), i, source.offset - 4)
            pieces = list(v0lm.decode_segment(source, stream, seg.frames, f"segment {i}", threads, seg.frames))
            yield SegmentCodes(torch.from_numpy(pieces[0])[None], scale, None)
    v0lm.check_end(source)
