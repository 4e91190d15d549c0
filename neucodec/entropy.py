"""Codes of one segment [B, K, F] <-> payload bytes: fixed-width bit packing or LM range coding.

Two coders:

* `pack`/`unpack`: each code in `bits` bits (10 for 1024-entry codebooks), LSB-first, in
  time-major order per sequence (for b, for t, for k) -- for B = 1 exactly the reference's
  `BitPacker` stream, so version-0 files use the same function.
* `lm_encode`/`lm_decode`: the entropy-coding LM predicts the K codes of frame t from frame t-1;
  constriction's queue `RangeEncoder` codes the B*K symbols of a frame in one call with
  `Categorical(perfect=False)` on C-contiguous float32 probabilities, stored as little-endian
  uint32 words. Encoder and decoder get probabilities from the same function (`_FrameModel`),
  which steps the LM one frame at a time on the CPU with a fixed thread count (`LM_THREADS`),
  because float results depend on the thread count. Many segments can be coded in one batch
  (`lm_encode_many`/`lm_decode_many`); each keeps its own coder and its own LM state.

`encode_segment` picks the coder for a segment and, for the LM, decodes its own payload before
returning it; if that does not give back the codes it falls back to packing, so it never
produces a payload that does not decode on the machine that wrote it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing as tp
import zlib

import constriction
import numpy as np
import torch

from .errors import CorruptStream
from .lm import LanguageModel, LMState

Tensor = torch.Tensor

LM_THREADS = 1  # torch threads while the LM runs; part of the format (recorded in the header)
PROB_GRID = 2.0 ** -20  # probabilities are floored to this grid (narrows cross-machine float noise)
_FAMILY = constriction.stream.model.Categorical(perfect=False)


# ---------------------------------------------------------------- checks
def codes_crc32(codes: Tensor | np.ndarray) -> int:
    """CRC32 of codes [B, K, F] written as little-endian uint16 in C order (stored per segment)."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    return zlib.crc32(np.ascontiguousarray(arr, dtype="<u2").tobytes()) & 0xFFFFFFFF


def _as_numpy(codes: Tensor | np.ndarray) -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if arr.ndim != 3:
        raise ValueError(f"codes must be [B, K, F], got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


# ---------------------------------------------------------------- packing
def packed_size(B: int, K: int, F: int, bits: int = 10) -> int:
    return (B * K * F * bits + 7) // 8


def pack(codes: Tensor | np.ndarray, bits: int = 10) -> bytes:
    """Codes [B, K, F] -> ceil(B*K*F*bits/8) bytes, `bits` per code, LSB-first, time-major per item.

    Args:
        codes: integers in [0, 2**bits).
        bits: width of each code.
    Returns:
        the packed bytes; the last byte is zero-padded at the top.
    """
    arr = _as_numpy(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits})")
    flat = arr.transpose(0, 2, 1).reshape(-1)  # for b, for t, for k
    bitarr = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bitarr.reshape(-1), bitorder="little").tobytes()


def unpack(payload: bytes, B: int, K: int, F: int, bits: int = 10, where: str = "segment") -> Tensor:
    """Inverse of `pack`: payload -> codes [B, K, F] int64. The size must be exact, padding zero."""
    n = B * K * F
    expected = packed_size(B, K, F, bits)
    if len(payload) != expected:
        raise CorruptStream(f"{where}: packed payload has {len(payload)} bytes, expected {expected} "
                            f"for {B}x{K}x{F} codes (file damaged)")
    bitarr = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")
    if bitarr[n * bits:].any():
        raise CorruptStream(f"{where}: non-zero padding bits (file damaged)")
    values = bitarr[: n * bits].reshape(n, bits).astype(np.int64) << np.arange(bits)
    flat = values.sum(axis=1)
    return torch.from_numpy(np.ascontiguousarray(flat.reshape(B, F, K).transpose(0, 2, 1)))


# ---------------------------------------------------------------- LM plumbing
@contextlib.contextmanager
def lm_threads(n: int = LM_THREADS) -> tp.Iterator[None]:
    """Run the body with `torch.set_num_threads(n)` and inference mode; restore the old count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(old)


def quantize_probs(probs: Tensor) -> np.ndarray:
    """LM probabilities [..., card] -> C-contiguous float32 rows [N, card] floored to `PROB_GRID`."""
    p = torch.floor(probs.float() * (1.0 / PROB_GRID)) * PROB_GRID
    return np.ascontiguousarray(p.reshape(-1, p.shape[-1]).numpy(), dtype=np.float32)


class _FrameModel:
    """Steps the LM for a batch of sequences; the single source of probabilities for both sides."""

    def __init__(self, lm: LanguageModel, batch: int, K: int) -> None:
        if K > lm.cfg.n_q:
            raise CorruptStream(f"{K} codebooks but the LM models only {lm.cfg.n_q}")
        self.lm = lm
        self.K = K
        self.state: LMState = lm.init_state(batch)
        self.device = lm.transformer.norm_in.weight.device

    def probs(self, previous: np.ndarray | None) -> np.ndarray:
        """previous codes [B, K] (None at frame 0) -> float32 probabilities [B*K, card]."""
        prev = None if previous is None else torch.from_numpy(previous).to(self.device)
        probs, self.state = self.lm.step(prev, self.state, self.K)
        return quantize_probs(probs.cpu())


def _check_same_K(items: tp.Sequence[tuple[int, int, int]]) -> int:
    Ks = {k for _, k, _ in items}
    if len(Ks) != 1:
        raise ValueError(f"all segments coded together must have the same K, got {sorted(Ks)}")
    return Ks.pop()


def _split_rows(B: int, F: int, span: int | None) -> tuple[int, np.ndarray]:
    """Rows of a segment [B, K, F] cut into spans: row s*B + b is frames [s*span, (s+1)*span) of b."""
    span = F if not span or span >= F else span
    S = max(1, -(-F // span)) if F else 1
    lengths = np.array([min(span, max(0, F - s * span)) for s in range(S) for _ in range(B)], dtype=np.int64)
    return span, lengths


def _to_rows(a: np.ndarray, span: int, n_rows: int) -> np.ndarray:
    B, K, F = a.shape
    S = n_rows // B
    padded = np.zeros((B, K, S * span), dtype=np.int64)
    padded[:, :, :F] = a
    return padded.reshape(B, K, S, span).transpose(2, 0, 1, 3).reshape(S * B, K, span)


def _from_rows(rows: np.ndarray, B: int, F: int) -> np.ndarray:
    R, K, span = rows.shape
    S = R // B
    return rows.reshape(S, B, K, span).transpose(1, 2, 0, 3).reshape(B, K, S * span)[:, :, :F]


def lm_encode_many(lm: LanguageModel, items: tp.Sequence[Tensor | np.ndarray],
                   threads: int = LM_THREADS, span: int | None = None) -> list[bytes]:
    """LM-code several segments in one batched LM run.

    Each segment [B, K, F] is cut into spans of `span` frames (None: one span); every span of every
    sequence is an independent LM sequence (a row of the batch, fresh state), so a long segment
    costs ceil(F / span) times fewer LM steps. One range coder per segment codes, at each step t,
    the symbols of its rows that are still active, in row order (span-major, then sequence, then
    codebook).

    Args:
        lm: the entropy-coding LM (CPU float32).
        items: codes of each segment [B_i, K, F_i] (same K).
        threads: torch threads for the LM (must match the decoder's).
        span: frames per LM sequence (part of the format: recorded in the header).
    Returns:
        one payload per segment: its range coder's uint32 words, little-endian.
    """
    arrs = [_as_numpy(c) for c in items]
    if not arrs:
        return []
    K = _check_same_K([a.shape for a in arrs])
    layouts = [_split_rows(a.shape[0], a.shape[2], span) for a in arrs]
    rows_arr = [_to_rows(a, sp, len(lens)) for a, (sp, lens) in zip(arrs, layouts)]
    starts = np.cumsum([0] + [len(lens) for _, lens in layouts])
    T = max(int(lens.max()) if len(lens) else 0 for _, lens in layouts)
    encoders = [constriction.stream.queue.RangeEncoder() for _ in arrs]
    with lm_threads(threads):
        model = _FrameModel(lm, int(starts[-1]), K)
        full = np.zeros((int(starts[-1]), K), dtype=np.int64)
        previous: np.ndarray | None = None
        for t in range(T):
            probs = model.probs(previous).reshape(int(starts[-1]), K, -1)
            for i, (rows, (_, lens)) in enumerate(zip(rows_arr, layouts)):
                n = int((lens > t).sum())  # active rows form a prefix
                if n == 0:
                    continue
                symbols = np.ascontiguousarray(rows[:n, :, t].reshape(-1), dtype=np.int32)
                encoders[i].encode(symbols, _FAMILY, np.ascontiguousarray(
                    probs[starts[i]: starts[i] + n].reshape(-1, probs.shape[-1])))
                full[starts[i]: starts[i] + len(lens)] = rows[:, :, t]
            previous = full.copy()
    return [enc.get_compressed().astype("<u4").tobytes() for enc in encoders]


def lm_decode_many(lm: LanguageModel, payloads: tp.Sequence[bytes], shapes: tp.Sequence[tuple[int, int, int]],
                   threads: int = LM_THREADS, where: tp.Sequence[str] | None = None,
                   span: int | None = None) -> list[Tensor]:
    """Inverse of `lm_encode_many`: payloads + shapes [(B_i, K, F_i)] -> codes [B_i, K, F_i] int64."""
    if not payloads:
        return []
    where = list(where) if where is not None else [f"segment {i}" for i in range(len(payloads))]
    K = _check_same_K(shapes)
    decoders = []
    for p, w in zip(payloads, where):
        if len(p) % 4:
            raise CorruptStream(f"{w}: LM payload of {len(p)} bytes is not a whole number of 32-bit words")
        decoders.append(constriction.stream.queue.RangeDecoder(np.frombuffer(p, dtype="<u4").astype(np.uint32)))
    layouts = [_split_rows(B, F, span) for B, _, F in shapes]
    rows_arr = [np.zeros((len(lens), K, sp), dtype=np.int64) for sp, lens in layouts]
    starts = np.cumsum([0] + [len(lens) for _, lens in layouts])
    T = max(int(lens.max()) if len(lens) else 0 for _, lens in layouts)
    with lm_threads(threads):
        model = _FrameModel(lm, int(starts[-1]), K)
        full = np.zeros((int(starts[-1]), K), dtype=np.int64)
        previous: np.ndarray | None = None
        for t in range(T):
            probs = model.probs(previous).reshape(int(starts[-1]), K, -1)
            for i, (rows, (_, lens)) in enumerate(zip(rows_arr, layouts)):
                n = int((lens > t).sum())
                if n == 0:
                    continue
                try:
                    sym = decoders[i].decode(_FAMILY, np.ascontiguousarray(
                        probs[starts[i]: starts[i] + n].reshape(-1, probs.shape[-1])))
                except (AssertionError, ValueError, RuntimeError, KeyError) as e:
                    raise CorruptStream(f"{where[i]}: LM stream undecodable at frame {t} "
                                        f"({str(e).splitlines()[0][:80]})") from None
                rows[:n, :, t] = sym.astype(np.int64).reshape(n, K)
                full[starts[i]: starts[i] + len(lens)] = rows[:, :, t]
            previous = full.copy()
    return [torch.from_numpy(np.ascontiguousarray(_from_rows(rows, B, F)))
            for rows, (B, _, F) in zip(rows_arr, shapes)]


def lm_encode(lm: LanguageModel, codes: Tensor | np.ndarray, n_q: int | None = None,
              threads: int = LM_THREADS, span: int | None = None) -> bytes:
    """LM-code one segment: codes [B, K, F] -> payload (B independent sequences, one coder).

    Args:
        lm: the entropy-coding LM.
        codes: [B, K, F] with K = `n_q` (checked when given).
        threads: torch threads for the LM.
    """
    arr = _as_numpy(codes)
    if n_q is not None and arr.shape[1] != n_q:
        raise ValueError(f"codes have {arr.shape[1]} codebooks, n_q says {n_q}")
    return lm_encode_many(lm, [arr], threads, span)[0]


def lm_decode(lm: LanguageModel, payload: bytes, B: int, K: int, F: int, threads: int = LM_THREADS,
              where: str = "segment", span: int | None = None) -> Tensor:
    """Inverse of `lm_encode`: payload -> codes [B, K, F] int64."""
    return lm_decode_many(lm, [payload], [(B, K, F)], threads, [where], span)[0]


# ---------------------------------------------------------------- coder choice
@dataclasses.dataclass
class CodedSegment:
    """What `encode_segments` returns for each segment."""

    flags: int  # container.SEGMENT_PACKED or container.SEGMENT_LM
    payload: bytes
    codes_crc: int


def encode_segments(items: tp.Sequence[Tensor | np.ndarray], lm: LanguageModel | None, bits: int = 10,
                    threads: int = LM_THREADS, span: int | None = None) -> list[CodedSegment]:
    """Code segments [B_i, K, F_i]: with the LM when given (verified by decoding), else packed.

    A segment whose LM payload does not decode back to its codes, or that is not smaller than
    its packed form, is packed instead.
    """
    from .container import SEGMENT_LM, SEGMENT_PACKED

    arrs = [_as_numpy(c) for c in items]
    packed = [pack(a, bits) for a in arrs]
    out = [CodedSegment(SEGMENT_PACKED, p, codes_crc32(a)) for a, p in zip(arrs, packed)]
    if lm is None or not arrs:
        return out
    try:
        coded = lm_encode_many(lm, arrs, threads, span)
        back = lm_decode_many(lm, coded, [a.shape for a in arrs], threads, span=span)
    except CorruptStream:
        return out
    for i, (a, c, b) in enumerate(zip(arrs, coded, back)):
        if np.array_equal(b.numpy(), a) and len(c) < len(packed[i]):
            out[i] = CodedSegment(SEGMENT_LM, c, out[i].codes_crc)
    return out


def decode_segments(records: tp.Sequence[tuple[int, bytes, tuple[int, int, int], str]], lm: LanguageModel | None,
                    bits: int = 10, threads: int = LM_THREADS, span: int | None = None) -> list[Tensor]:
    """Decode segments given as (flags, payload, (B, K, F), where); LM ones in one batch."""
    from .container import SEGMENT_LM

    out: list[Tensor | None] = [None] * len(records)
    lm_idx = [i for i, r in enumerate(records) if r[0] == SEGMENT_LM]
    for i, (flags, payload, (B, K, F), where) in enumerate(records):
        if flags != SEGMENT_LM:
            out[i] = unpack(payload, B, K, F, bits, where)
    if lm_idx:
        if lm is None:
            raise CorruptStream(f"{records[lm_idx[0]][3]}: LM-coded but no LM is available")
        decoded = lm_decode_many(lm, [records[i][1] for i in lm_idx], [records[i][2] for i in lm_idx],
                                 threads, [records[i][3] for i in lm_idx], span)
        for i, d in zip(lm_idx, decoded):
            out[i] = d
    return tp.cast(list[Tensor], out)
