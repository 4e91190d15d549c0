"""Codes of segments [B, K, F] <-> payload bytes: LM range coding, or fixed-width packing (`neucodec.packing`).

`lm_encode`/`lm_decode`: the entropy-coding LM predicts the K codes of frame t from frame t-1;
constriction's queue `RangeEncoder` codes the B*K symbols of a frame in one call with
`Categorical(perfect=False)` on C-contiguous float32 probabilities, stored as little-endian
uint32 words. Encoder and decoder get probabilities from the same object (`_FrameModel`),
which runs the LM on the CPU with a fixed thread count (`LM_THREADS`): the decoder steps it one
frame at a time, the encoder, which knows every frame, computes several steps at once with the
same results (`ExactLM.run_known`). Segments are coded with an `exactlm.ExactLM` (the same bits
on every machine); a float32 `LanguageModel` decodes the segments of neucodec 0.1.0 (flags 1),
whose probabilities depend on the CPU and torch build. Many segments can be coded in one batch
(`lm_encode_many`/`lm_decode_many`); each keeps its own coder and its own LM state.

`encode_segments` picks the coder for each segment and, for the LM, decodes its own payload before
returning it; if that does not give back the codes it falls back to packing, so it never
produces a payload that does not decode on the machine that wrote it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import typing as tp
import zlib

import constriction
import numpy as np
import torch

from .container import ARITHMETIC_FLAGS, FLAG_ARITHMETIC, LM_FLAGS, SEGMENT_PACKED
from .errors import CorruptStream
from .exactlm import ExactLM, exact
from .lm import LanguageModel, LMState
from .packing import codes_array, pack, unpack

Tensor = torch.Tensor

LM_THREADS = 1  # torch threads while the LM runs; part of the format (recorded in the header)
PROB_GRID = 2.0 ** -20  # probabilities are floored to this grid (narrows cross-machine float noise)
LM_SPAN_SECONDS = 1.0  # writer's choice of LM sequence length (see lm_span); readers follow the header
LM_BATCH = 8  # segments a stream's writer or reader codes in one call (one batched LM run)
LM_ROWS = 32  # LM sequences stepped together at most (each holds ~4 MB of keys/values for the paper's LM)
VERIFY_TABLE_BYTES = 128 << 20  # encoder's check: probability tables kept up to this size (see encode_segments)
_FAMILY = constriction.stream.model.Categorical(perfect=False)


# ---------------------------------------------------------------- checks
def codes_crc32(codes: Tensor | np.ndarray) -> int:
    """CRC32 of codes [B, K, F] written as little-endian uint16 in C order (stored per segment)."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    return zlib.crc32(np.ascontiguousarray(arr, dtype="<u2").tobytes()) & 0xFFFFFFFF


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


def _coder_failure(e: BaseException) -> bool:
    """Whether constriction rejected its input: a Python error, or a Rust panic, which pyo3 raises as
    `PanicException`, a BaseException (measured: "leakiness should guarantee nonzero probabilities"
    when a symbol whose floored probability is 0 meets a row dominated by one symbol)."""
    return isinstance(e, (AssertionError, ValueError, RuntimeError, KeyError)) or type(e).__name__ == "PanicException"


def _quantize_probs_(probs: Tensor) -> None:
    """Floor float32 LM probabilities [..., card] to `PROB_GRID`, in place."""
    probs.mul_(1.0 / PROB_GRID).floor_().mul_(PROB_GRID)


def _empty_rows(*shape: int) -> np.ndarray:
    """Uninitialised float32 array whose data starts on a 64-byte boundary, like a torch tensor's."""
    n = int(np.prod(shape))
    raw = np.empty(n + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip: skip + n].reshape(shape)


class _FrameModel:
    """Steps the LM for a batch of sequences; the single source of probabilities for both sides.

    The decoder steps it one frame at a time (`probs`); the encoder, which knows every frame in
    advance, has it compute several steps at once (`known`, `ExactLM.run_known`: the same
    probabilities, bit for bit). Probabilities go to one reused array, or with `tables` to
    consecutive slices of one array for the whole run (large numpy arrays get transparent huge
    pages: far fewer page faults than a fresh megabyte per step).
    """

    def __init__(self, lm: LanguageModel | ExactLM, batch: int, K: int, steps: int,
                 tables: list[np.ndarray] | None = None, chunk: int = 1) -> None:
        if K > lm.cfg.n_q:
            raise CorruptStream(f"{K} codebooks but the LM models only {lm.cfg.n_q}")
        self.lm = lm
        self.K = K
        self.state: LMState = lm.init_state(batch, steps)
        self.device = lm.device if hasattr(lm, "device") else lm.transformer.norm_in.weight.device
        self.tables = tables
        self.on_grid = isinstance(lm, ExactLM)  # its probabilities are already multiples of PROB_GRID
        self.buffer = _empty_rows(steps if tables is not None else chunk, batch * K, lm.cfg.card)
        self.t = 0

    def _out(self, n: int) -> np.ndarray:
        return self.buffer[self.t: self.t + n] if self.tables is not None else self.buffer[:n]

    def _done(self, rows: np.ndarray) -> None:
        if not self.on_grid:
            _quantize_probs_(torch.from_numpy(rows))
        if self.tables is not None:
            self.tables.extend(rows)
        self.t += len(rows)

    def probs(self, previous: np.ndarray | None) -> np.ndarray:
        """previous codes [B, K] (None at frame 0) -> float32 probabilities [B*K, card].

        The array returned is overwritten by the next call unless the model keeps `tables`.
        """
        prev = None if previous is None else torch.from_numpy(previous).to(self.device)
        rows = self._out(1)
        out = torch.from_numpy(rows[0]).view(self.state.batch, self.K, -1)
        if self.device.type != "cpu":
            probs, self.state = self.lm.step(prev, self.state, self.K)
            out.copy_(probs)
        else:
            self.state = self.lm.step(prev, self.state, self.K, out=out)[1]
        self._done(rows)
        return rows[0]

    def known(self, previous: np.ndarray) -> np.ndarray:
        """The next n steps at once: previous codes [n, B, K] (-1: none) -> probabilities [n, B*K, card].
        Only an `ExactLM` computes steps at once (`run_known`).

        The array returned is overwritten by the next call unless the model keeps `tables`.
        """
        if not isinstance(self.lm, ExactLM):
            raise TypeError("segments are LM-coded with exact arithmetic only: pass exactlm.exact(lm)")
        rows = self._out(len(previous))
        out = torch.from_numpy(rows).view(len(previous), self.state.batch, self.K, -1)
        self.state = self.lm.run_known(torch.from_numpy(previous), self.state, self.K, out)
        self._done(rows)
        return rows


def _chunks(steps: int, most: int) -> list[int]:
    """`steps` cut into the fewest runs of at most `most`, of near-equal lengths (fewer shapes)."""
    n = max(1, -(-steps // max(1, most)))
    return [steps // n + (i < steps % n) for i in range(n)] if steps else []


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


def lm_span(segment_frames: int, past_context: int, frame_rate: int) -> int:
    """Frames per LM sequence that the writer picks for segments of `segment_frames` frames.

    Spans of about `LM_SPAN_SECONDS`, longer when a segment would otherwise have more than
    `LM_ROWS` of them, never longer than the LM's `past_context`; of equal length within a
    segment, so that no row idles while the longest one finishes. Shorter spans mean more rows
    per LM step and fewer steps -- much faster on a CPU -- for a small loss: each span starts
    without context (docs/benchmarks.md measures both). Readers take the span from the header.
    """
    longest = max(round(LM_SPAN_SECONDS * frame_rate), -(-segment_frames // LM_ROWS))
    longest = max(1, min(past_context, longest))
    n = max(1, -(-segment_frames // longest))
    return max(1, -(-segment_frames // n))


@dataclasses.dataclass
class _Batch:
    """Row layout of segments coded together: segment i owns rows starts[i]..starts[i+1]."""

    layouts: list[tuple[int, np.ndarray]]  # (span, frames of each row)
    starts: np.ndarray
    steps: int  # LM steps: the longest row

    @classmethod
    def of(cls, shapes: tp.Sequence[tuple[int, int, int]], span: int | None) -> _Batch:
        layouts = [_split_rows(B, F, span) for B, _, F in shapes]
        starts = np.cumsum([0] + [len(lens) for _, lens in layouts])
        return cls(layouts, starts, max(int(lens.max()) if len(lens) else 0 for _, lens in layouts))

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def active(self, i: int, t: int) -> int:
        """Rows of segment i that have a frame t (they form a prefix)."""
        return int((self.layouts[i][1] > t).sum())


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


def _known_previous(rows_arr: list[np.ndarray], batch: _Batch, K: int) -> np.ndarray:
    """The `previous` codes of every LM step [steps, rows, K] as `lm_decode_many` feeds them: -1
    (none) at step 0, then each row's codes of the frame before (a segment's rows keep those of
    its last step once it has ended, rows of a segment without frames 0)."""
    T = batch.steps
    previous = np.zeros((T, batch.rows, K), dtype=np.int64)
    previous[:1] = -1
    for i, rows in enumerate(rows_arr):
        last = int(batch.layouts[i][1].max()) if len(batch.layouts[i][1]) else 0
        if last and T > 1:
            s = int(batch.starts[i])
            frames = np.minimum(np.arange(T - 1), last - 1)
            previous[1:, s: s + len(rows)] = rows[:, :, frames].transpose(2, 0, 1)
    return previous


def lm_encode_many(lm: ExactLM, items: tp.Sequence[Tensor | np.ndarray], threads: int = LM_THREADS,
                   span: int | None = None, tables: list[np.ndarray] | None = None) -> list[bytes]:
    """LM-code several segments in one batched LM run.

    Each segment [B, K, F] is cut into spans of `span` frames (None: one span); every span of every
    sequence is an independent LM sequence (a row of the batch, fresh state), so a long segment
    costs ceil(F / span) times fewer LM steps. One range coder per segment codes, at each step t,
    the symbols of its rows that are still active, in row order (span-major, then sequence, then
    codebook).

    Args:
        lm: the entropy-coding LM in exact arithmetic (`exactlm.exact`).
        items: codes of each segment [B_i, K, F_i] (same K).
        threads: torch threads for the LM (an `ExactLM` gives the same bits with any count).
        span: frames per LM sequence (part of the format: recorded in the header).
        tables: if given, receives the probabilities of every step ([rows*K, card] float32), for
            `lm_decode_many` to check the payloads without running the LM again.
    Returns:
        one payload per segment: its range coder's uint32 words, little-endian.
    """
    arrs = [codes_array(c) for c in items]
    if not arrs:
        return []
    K = _check_same_K([a.shape for a in arrs])
    batch = _Batch.of([a.shape for a in arrs], span)
    rows_arr = [_to_rows(a, sp, len(lens)) for a, (sp, lens) in zip(arrs, batch.layouts)]
    encoders = [constriction.stream.queue.RangeEncoder() for _ in arrs]
    with lm_threads(threads):
        chunks = _chunks(batch.steps, lm.known_chunk(batch.rows, K))
        model = _FrameModel(lm, batch.rows, K, batch.steps, tables, max(chunks, default=1))
        previous = _known_previous(rows_arr, batch, K)
        t = 0
        for n in chunks:
            for probs in model.known(previous[t: t + n]):
                for i, rows in enumerate(rows_arr):
                    n_i, s = batch.active(i, t), int(batch.starts[i])
                    if n_i:
                        symbols = np.ascontiguousarray(rows[:n_i, :, t].reshape(-1), dtype=np.int32)
                        try:
                            encoders[i].encode(symbols, _FAMILY, probs[s * K: (s + n_i) * K])
                        except BaseException as e:
                            if not _coder_failure(e):
                                raise
                            raise CorruptStream(f"segment {i}: the range coder refused frame {t} "
                                                f"({str(e).splitlines()[0][:80]})") from None
                t += 1
    return [enc.get_compressed().astype("<u4").tobytes() for enc in encoders]


def lm_decode_many(lm: LanguageModel | ExactLM, payloads: tp.Sequence[bytes], shapes: tp.Sequence[tuple[int, int, int]],
                   threads: int = LM_THREADS, where: tp.Sequence[str] | None = None,
                   span: int | None = None, tables: tp.Sequence[np.ndarray] | None = None) -> list[Tensor]:
    """Inverse of `lm_encode_many`: payloads + shapes [(B_i, K, F_i)] -> codes [B_i, K, F_i] int64.

    `tables`: the probabilities `lm_encode_many` recorded for these segments, used instead of
    running the LM (the encoder's check of its range coding, see `encode_segments`).
    """
    if not payloads:
        return []
    where = list(where) if where is not None else [f"segment {i}" for i in range(len(payloads))]
    K = _check_same_K(shapes)
    decoders = []
    for p, w in zip(payloads, where):
        if len(p) % 4:
            raise CorruptStream(f"{w}: LM payload of {len(p)} bytes is not a whole number of 32-bit words")
        decoders.append(constriction.stream.queue.RangeDecoder(np.frombuffer(p, dtype="<u4").astype(np.uint32)))
    batch = _Batch.of(shapes, span)
    rows_arr = [np.zeros((len(lens), K, sp), dtype=np.int64) for sp, lens in batch.layouts]
    with lm_threads(threads):
        model = _FrameModel(lm, batch.rows, K, batch.steps) if tables is None else None
        previous = np.zeros((batch.rows, K), dtype=np.int64)
        for t in range(batch.steps):
            probs = model.probs(previous if t else None) if model is not None else tables[t]  # type: ignore[index]
            for i, rows in enumerate(rows_arr):
                n, s = batch.active(i, t), int(batch.starts[i])
                if n:
                    try:
                        sym = decoders[i].decode(_FAMILY, probs[s * K: (s + n) * K])
                    except BaseException as e:
                        if not _coder_failure(e):
                            raise
                        raise CorruptStream(f"{where[i]}: LM stream undecodable at frame {t} "
                                            f"({str(e).splitlines()[0][:80]})") from None
                    rows[:n, :, t] = sym.reshape(n, K)
                    previous[s: s + len(rows)] = rows[:, :, t]
    return [torch.from_numpy(np.ascontiguousarray(_from_rows(rows, B, F)))
            for rows, (B, _, F) in zip(rows_arr, shapes)]


def lm_encode(lm: ExactLM, codes: Tensor | np.ndarray, n_q: int | None = None,
              threads: int = LM_THREADS, span: int | None = None) -> bytes:
    """LM-code one segment: codes [B, K, F] -> payload (B independent sequences, one coder).

    Args:
        lm: the entropy-coding LM in exact arithmetic.
        codes: [B, K, F] with K = `n_q` (checked when given).
        threads: torch threads for the LM.
    """
    arr = codes_array(codes)
    if n_q is not None and arr.shape[1] != n_q:
        raise ValueError(f"codes have {arr.shape[1]} codebooks, n_q says {n_q}")
    return lm_encode_many(lm, [arr], threads, span)[0]


def lm_decode(lm: LanguageModel | ExactLM, payload: bytes, B: int, K: int, F: int, threads: int = LM_THREADS,
              where: str = "segment", span: int | None = None) -> Tensor:
    """Inverse of `lm_encode`: payload -> codes [B, K, F] int64."""
    return lm_decode_many(lm, [payload], [(B, K, F)], threads, [where], span)[0]


# ---------------------------------------------------------------- coder choice
@dataclasses.dataclass
class CodedSegment:
    """What `encode_segments` returns for each segment."""

    flags: int  # container.SEGMENT_PACKED or one of container.LM_FLAGS
    payload: bytes
    codes_crc: int


def encode_segments(items: tp.Sequence[Tensor | np.ndarray], lm: ExactLM | None, bits: int = 10,
                    threads: int = LM_THREADS, span: int | None = None) -> list[CodedSegment]:
    """Code segments [B_i, K, F_i]: with the LM when given (verified by decoding), else packed.

    A segment whose LM payload does not decode back to its codes, or that is not smaller than
    its packed form, is packed instead. LM-coded segments get the flags of the LM's arithmetic
    (`container.ARITHMETIC_FLAGS`; the writer's: exact-v2, flags 3). Groups of segments run in
    parallel on up to `torch.get_num_threads()` Python threads, each running the LM with
    `threads` torch threads (see `_workers`).

    The check range-decodes every payload with `lm_decode_many` -- the decoder's own loop, row
    layout and constriction calls -- fed with the probability tables the encoding pass recorded
    (segments are coded in groups whose tables fit in `VERIFY_TABLE_BYTES`, see `_groups`; a
    single segment too large for that is checked by running the LM again). Running the LM a
    second time would only repeat the computation just done: with exact arithmetic its results
    do not depend on the machine, the thread count, the batch or the chunking (`exactlm`, tested
    in tests/test_exactlm.py). What can fail here is the range coding itself -- probabilities
    constriction cannot model, a symbol it cannot code, a payload that decodes to other codes --
    and the check decodes exactly that.
    """
    arrs = [codes_array(c) for c in items]
    packed = [pack(a, bits) for a in arrs]
    out = [CodedSegment(SEGMENT_PACKED, p, codes_crc32(a)) for a, p in zip(arrs, packed)]
    if lm is None or not arrs:
        return out
    if not isinstance(lm, ExactLM):
        raise TypeError("segments are LM-coded with exact arithmetic only: pass exactlm.exact(lm)")
    flags = ARITHMETIC_FLAGS[lm.arithmetic]
    workers = _workers(lm)

    def code(group: list[int]) -> list[bytes | None]:
        shapes = [arrs[i].shape for i in group]
        tables: list[np.ndarray] | None = [] if _table_bytes(shapes, span, lm.cfg.card) <= VERIFY_TABLE_BYTES \
            else None
        try:
            coded = lm_encode_many(lm, [arrs[i] for i in group], threads, span, tables)
            back = lm_decode_many(lm, coded, shapes, threads, span=span, tables=tables)
        except CorruptStream:
            return [None] * len(group)
        return [c if np.array_equal(b.numpy(), arrs[i]) else None for i, c, b in zip(group, coded, back)]

    groups = _groups([a.shape for a in arrs], span, lm.cfg.card, workers)
    for group, coded in zip(groups, _map(code, groups, workers, threads)):
        for i, c in zip(group, coded):
            if c is not None and len(c) < len(packed[i]):
                out[i] = CodedSegment(flags, c, out[i].codes_crc)
    return out


def _workers(lm: LanguageModel | ExactLM) -> int:
    """Python threads for LM groups: the exact LM's results do not depend on how segments are
    grouped, so its groups run in parallel, one per torch thread the caller allows (measured: two
    threads of 15 rows each take 0.58 of the time of one run of 30 rows on 2 idle cores, where a
    2-thread matrix product inside one run gains nothing). The float32 LM (decoding files of
    neucodec 0.1.0) keeps one run at a time: its grouping is part of the files it wrote."""
    return max(1, torch.get_num_threads()) if isinstance(lm, ExactLM) else 1


def _map(fn: tp.Callable[[list[int]], tp.Any], groups: list[list[int]], workers: int, threads: int) -> list[tp.Any]:
    """[fn(g) for g in groups], on up to `workers` threads (each with `threads` torch threads); in order."""
    if workers <= 1 or len(groups) <= 1:
        return [fn(g) for g in groups]
    old = torch.get_num_threads()
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(groups)),
                                               initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        try:
            return list(pool.map(fn, groups))
        finally:
            torch.set_num_threads(old)


def _table_bytes(shapes: tp.Sequence[tuple[int, int, int]], span: int | None, card: int) -> int:
    """Memory of the probability tables of segments coded together."""
    batch = _Batch.of(shapes, span)
    return 4 * batch.steps * batch.rows * shapes[0][1] * card


def _groups(shapes: tp.Sequence[tuple[int, int, int]], span: int | None, card: int | None = None,
            workers: int = 1) -> list[list[int]]:
    """Consecutive segments grouped into LM runs of at most `LM_ROWS` rows and, with `card` (the
    encoder's check), probability tables within `VERIFY_TABLE_BYTES`; a segment too large for
    that forms a group alone (checked, if need be, by running the LM again). With `workers` > 1
    a group also closes once it holds a `workers`-th of all rows, so that the groups can run side
    by side (three 10-row segments on two workers: 20 + 10 rows)."""
    share = -(-sum(_Batch.of([s], span).rows for s in shapes) // workers) if workers > 1 else None
    groups: list[list[int]] = []
    for i in range(len(shapes)):
        if groups:
            current = [shapes[j] for j in groups[-1]]
            together = current + [shapes[i]]
            if _Batch.of(together, span).rows <= LM_ROWS and \
                    (share is None or _Batch.of(current, span).rows < share) and \
                    (card is None or _table_bytes(together, span, card) <= VERIFY_TABLE_BYTES):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def decode_segments(records: tp.Sequence[tuple[int, bytes, tuple[int, int, int], str]],
                    lm: LanguageModel | ExactLM | None, bits: int = 10, threads: int = LM_THREADS,
                    span: int | None = None) -> list[Tensor]:
    """Decode segments given as (flags, payload, (B, K, F), where); LM ones in batches, each with the
    LM arithmetic its flags name (`container.ARITHMETIC_FLAGS`: `exactlm`; `SEGMENT_LM`: the float32 LM)."""
    out: list[Tensor | None] = [None] * len(records)
    for i, (flags, payload, (B, K, F), where) in enumerate(records):
        if flags not in LM_FLAGS:
            out[i] = unpack(payload, B, K, F, bits, where)
    for flag in LM_FLAGS:
        lm_idx = [i for i, r in enumerate(records) if r[0] == flag]
        if not lm_idx:
            continue
        if lm is None:
            raise CorruptStream(f"{records[lm_idx[0]][3]}: LM-coded but no LM is available")
        base = lm.source if isinstance(lm, ExactLM) else lm
        arithmetic = FLAG_ARITHMETIC.get(flag)
        runner = exact(base, arithmetic) if arithmetic else base
        workers = _workers(runner)

        def decode(group: list[int], runner: LanguageModel | ExactLM = runner, lm_idx: list[int] = lm_idx
                   ) -> list[Tensor]:
            idx = [lm_idx[j] for j in group]
            return lm_decode_many(runner, [records[i][1] for i in idx], [records[i][2] for i in idx],
                                  threads, [records[i][3] for i in idx], span)

        groups = _groups([records[i][2] for i in lm_idx], span, workers=workers)
        for group, decoded in zip(groups, _map(decode, groups, workers, threads)):
            for j, d in zip(group, decoded):
                out[lm_idx[j]] = d
    return tp.cast(list[Tensor], out)
