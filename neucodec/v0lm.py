"""Reference (version-0) LM-coded `.ecdc` streams: the reference tool's arithmetic decoder and LM, bit for bit.

The reference `encodec` tool codes the K codes of each frame with an arithmetic coder driven by its
entropy-coding LM. Decoding such a file needs, for every symbol, exactly the integer CDF the
encoder used, so this module reproduces three things exactly:

1. **The LM's float32 probabilities.** `ReferenceLM` runs a `neucodec.lm.LanguageModel`'s
   parameters through the same torch operations, in the same order and with the same shapes, as
   the reference's streaming transformer: it caches each layer's *inputs* (starting with one zero
   vector), re-projects keys and values every step, attends through
   `F.multi_head_attention_forward` with the `past_context` mask, applies post-norm layers, adds
   cos-first sinusoidal positions, sums the K embeddings with Python's `sum`, and takes the softmax
   over the card axis of a `[1, card, K, 1]` tensor. neucodec's own fast `LanguageModel.step`
   (cached projected keys/values, padded rows, fused heads) gives the same maths but not the same
   last bits, which would flip CDF entries (measured: every step differs by up to ~1e-8).

2. **The probability -> CDF rule** (`quantized_cdf`), in float32 as the reference computes it::

       pdf   = floor(p / 1e-8) * 1e-8
       range = floor((1 - alpha) * 2**24 * pdf) + 2,   alpha = 2 * card / 2**24
       cdf   = cumsum(range)                           (int64, cdf[-1] <= 2**24 up to float error)

3. **The arithmetic decoder** (`ArithmeticDecoder`). The coder keeps integers ``low <= high`` and
   ``max_bit`` (the bit position of their top bit, -1 at the start). Before each symbol it
   *expands* the range while ``high - low + 1 < 2**24`` (``low = 2 low``, ``high = 2 high + 1``,
   ``max_bit += 1``; the decoder reads one stream bit into ``current`` per expansion), then
   *narrows* it to the symbol's share. With ``delta = high - low + 1`` and the symbol's CDF
   interval ``[c_lo, c_hi - 1]``::

       low' = low + ceil(c_lo * delta / 2**24),   high' = low + floor((c_hi - 1) * delta / 2**24)

   (the reference evaluates this in float64 as ``c * (delta / 2**24)``; with ``delta < 2**25`` and
   ``c < 2**24`` the products have fewer than 53 significant bits, so exact integer arithmetic
   gives the same numbers). Finally it *emits* the common top bits of low and high (the decoder
   just drops them). The decoder's symbol is the one whose narrowed interval contains
   ``current``; ``ceil(c_lo * delta / 2**24) <= current - low`` is equivalent to
   ``c_lo <= floor((current - low) * 2**24 / delta)``, so one binary search over the CDF finds it.
   Bits are read least-significant bit of each byte first. The encoder's final flush writes
   exactly the bits the decoder will read (one per expansion), padded to a byte, so each segment
   ends on a byte boundary and the next one starts at the next byte.

Each segment gets a fresh coder and a fresh LM state (zero input at the first frame, position 0).
Per frame the LM runs once and the K codes are decoded in order k = 0..K-1 with the CDFs of its
K probability rows.

**Thread count.** The probabilities depend on the number of torch threads the LM ran with: torch's
CPU attention kernel (reached through `F.multi_head_attention_forward`) shares the 8 heads out
among threads, and its float results change with the share (measured with torch 2.13: 1, 2, 3,
4-7 and 8 or more threads give different last bits). The reference tool uses torch's default,
the machine's core count, so a file decodes only with the thread count it was written with
(the reference's own decoder has the same limit). `decode_segment` runs the LM with the thread
count it is given; other ops (embeddings, linears, norms, softmax) were measured not to depend
on it. Results can also depend on the CPU family and torch build, like the reference's own.
"""
from __future__ import annotations

import typing as tp

import numpy as np
import torch
import torch.nn.functional as F

from .entropy import lm_threads
from .errors import CorruptStream, ModelMismatch
from .lm import LanguageModel, sin_embedding

Tensor = torch.Tensor

TOTAL_RANGE_BITS = 24  # the reference coder's range width 2**24
ROUNDOFF = 1e-8  # probabilities are floored to this step before quantisation
MIN_RANGE = 2  # every symbol keeps at least this much of the 2**24 range
MAX_BIT = 61  # the reference encoder asserts max_bit <= 61 after every symbol; more means damage
READ_BYTES = 1 << 16


def quantized_cdf(probs: Tensor) -> np.ndarray:
    """Probabilities [card, K] (float32, any strides) -> integer CDFs [K, card] (int64).

    Element-wise the same float32 operations as the reference's `build_stable_quantized_cdf`,
    applied to all K columns at once (element-wise results do not depend on the layout).
    """
    card = probs.shape[0]
    total = 2 ** TOTAL_RANGE_BITS
    alpha = MIN_RANGE * card / total
    pdf = (probs / ROUNDOFF).floor() * ROUNDOFF
    ranges = (((1 - alpha) * total) * pdf).floor().long() + MIN_RANGE
    return torch.cumsum(ranges, dim=0).t().contiguous().numpy()


class ByteSource:
    """Bytes of a file object, read ahead in pieces, with the absolute offset of the next byte."""

    def __init__(self, fi: tp.BinaryIO, offset: int) -> None:
        self._read = getattr(fi, "read1", fi.read)  # read1: a pipe need not fill the whole piece
        self.offset = offset
        self._buf = b""
        self._pos = 0

    def next_byte(self, what: str) -> int:
        if self._pos == len(self._buf):
            self._buf = self._read(READ_BYTES)
            self._pos = 0
            if not self._buf:
                raise CorruptStream(f"{what}: file truncated at byte {self.offset} (the coded codes end early)")
        byte = self._buf[self._pos]
        self._pos += 1
        self.offset += 1
        return byte

    def read(self, n: int, what: str) -> bytes:
        """Exactly n bytes (n small)."""
        return bytes(self.next_byte(what) for _ in range(n))


class ArithmeticDecoder:
    """Decoder of one segment of the reference's arithmetic code (see the module docstring).

    Args:
        source: the stream, positioned at the first byte of the segment's code.
        where: prefix of error messages (e.g. "segment 2").
    """

    def __init__(self, source: ByteSource, where: str) -> None:
        self.source = source
        self.where = where
        self.low = 0
        self.high = 0
        self.current = 0
        self.max_bit = -1
        self._byte = 0
        self._bits_left = 0

    def pull(self, cdf: np.ndarray) -> int:
        """Decode one symbol with the integer CDF `cdf` [card] (from `quantized_cdf`)."""
        low, high, current, max_bit = self.low, self.high, self.current, self.max_bit
        total = 1 << TOTAL_RANGE_BITS
        while high - low + 1 < total:  # expand, reading one bit per doubling
            if not self._bits_left:
                self._byte = self.source.next_byte(self.where)
                self._bits_left = 8
            bit = self._byte & 1
            self._byte >>= 1
            self._bits_left -= 1
            low <<= 1
            high = (high << 1) | 1
            current = (current << 1) | bit
            max_bit += 1
        delta = high - low + 1
        target = current - low
        symbol = int(np.searchsorted(cdf, (target << TOTAL_RANGE_BITS) // delta, side="right"))
        if target < 0 or symbol >= len(cdf):
            raise self._damaged()
        c_lo = int(cdf[symbol - 1]) if symbol else 0
        eff_low = -((-c_lo * delta) >> TOTAL_RANGE_BITS)  # ceil
        eff_high = ((int(cdf[symbol]) - 1) * delta) >> TOTAL_RANGE_BITS  # floor
        if not eff_low <= target <= eff_high:
            raise self._damaged()
        high = low + eff_high
        low += eff_low
        while max_bit >= 0:  # drop the common top bits
            top = low >> max_bit
            if top != high >> max_bit:
                break
            if top:
                low -= 1 << max_bit
                high -= 1 << max_bit
                current -= 1 << max_bit
            max_bit -= 1
        if max_bit > MAX_BIT:
            raise self._damaged()
        self.low, self.high, self.current, self.max_bit = low, high, current, max_bit
        return symbol

    def _damaged(self) -> CorruptStream:
        return CorruptStream(f"{self.where} near byte {self.source.offset}: the coded codes do not decode (file "
                             "damaged, or LM probabilities differ from the writer's: other LM, torch thread count "
                             "or torch build)")


class ReferenceLM:
    """Streaming LM with the reference `LMModel`'s exact float32 results (batch 1), on CPU.

    Uses the parameters of `lm` (an official-layout `LanguageModel`) without copying them.

    Args:
        lm: the entropy-coding LM (`encodec_lm_24khz` / `encodec_lm_48khz`, or the same layout).
        K: codebooks coded, at most `lm.cfg.n_q`.
    """

    def __init__(self, lm: LanguageModel, K: int) -> None:
        cfg = lm.cfg
        if not 1 <= K <= cfg.n_q:
            raise ModelMismatch(f"the file codes {K} codebooks but the LM models {cfg.n_q}")
        self.K = K
        self.dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.past_context = cfg.past_context
        mp = cfg.max_period
        self.max_period = int(mp) if float(mp).is_integer() else mp  # the reference's literal is an int
        self.tables = [lm.emb[k].weight for k in range(K)]
        self.heads = [(lm.head_weight(k), lm.linears[k].bias) for k in range(K)]
        self.norm_in = lm.transformer.norm_in
        self.layers = list(lm.transformer.layers)
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: zero input, position 0, one zero vector cached per layer."""
        self.states: list[Tensor] | None = None
        self.offset = 0

    def step(self, previous: Tensor | None) -> Tensor:
        """Codes of the previous frame [K] (None at the first frame) -> probabilities [card, K].

        The result is a view of the reference's `[1, card, K, 1]` softmax output.
        """
        K = self.K
        indices = torch.zeros(1, K, 1, dtype=torch.long) if previous is None else 1 + previous.view(1, K, 1)
        x = sum([F.embedding(indices[:, k], self.tables[k]) for k in range(K)])
        x = tp.cast(Tensor, x)
        _, T, C = x.shape
        if self.states is None:
            self.states = [torch.zeros_like(x[:, :1]) for _ in range(1 + len(self.layers))]
        positions = torch.arange(T).view(1, -1, 1) + self.offset
        pos_emb = sin_embedding(positions, C, self.max_period)
        x = self.norm_in(x)
        x = x + pos_emb
        new_states = []
        for past, layer in zip(self.states, self.layers):
            layer_input = x
            x = layer.norm1(x + self._attend(layer, x, past))
            x = layer.norm2(x + layer.linear2(F.gelu(layer.linear1(x))))
            new_states.append(torch.cat([past, layer_input], dim=1)[:, -self.past_context:, :])
        self.states = new_states
        self.offset += T
        logits = torch.stack([F.linear(x, w, b) for w, b in self.heads], dim=1).permute(0, 3, 1, 2)
        return torch.softmax(logits, dim=1)[0, :, :, 0]

    def _attend(self, layer: torch.nn.Module, x: Tensor, past: Tensor) -> Tensor:
        """Self-attention of x [1, T, C] over [past, x], as `nn.MultiheadAttention` (batch_first) runs it."""
        _, T, _ = x.shape
        H = past.shape[1]
        keys = torch.cat([past, x], dim=1)
        q_pos = torch.arange(H, T + H).view(-1, 1)
        k_pos = torch.arange(T + H).view(1, -1)
        delta = q_pos - k_pos
        visible = (delta >= 0) & (delta <= self.past_context)
        attn = layer.self_attn
        q, k = x.transpose(1, 0), keys.transpose(1, 0)
        out, _ = F.multi_head_attention_forward(
            q, k, k, self.dim, self.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
            attn.out_proj.weight, attn.out_proj.bias, training=False, key_padding_mask=None, need_weights=False,
            attn_mask=~visible, average_attn_weights=True, is_causal=False)
        return out.transpose(1, 0)


def decode_segment(source: ByteSource, lm: ReferenceLM, frames: int, where: str, threads: int,
                   chunk_frames: int = 800) -> tp.Iterator[np.ndarray]:
    """Decode one reference LM-coded segment of `frames` frames: yields codes [K, f] in time order.

    Args:
        source: positioned at the segment's first byte; when the iterator is exhausted it stands
            at the first byte after the segment.
        lm: the streaming LM (reset here).
        frames: frames of the segment.
        where: prefix of error messages.
        threads: torch threads for the LM: those the writer's LM ran with (see the module docstring).
        chunk_frames: frames per yielded piece (the last one fewer). The caller's thread count is
            restored while it holds a piece.
    """
    decoder = ArithmeticDecoder(source, where)
    lm.reset()
    K = lm.K
    previous: Tensor | None = None
    done = 0
    while done < frames:
        n = min(chunk_frames, frames - done)
        out = np.empty((K, n), dtype=np.int64)
        with lm_threads(threads):
            for t in range(n):
                cdf = quantized_cdf(lm.step(previous))
                for k in range(K):
                    out[k, t] = decoder.pull(cdf[k])
                previous = torch.from_numpy(out[:, t].copy())
        done += n
        yield out


def check_end(source: ByteSource) -> None:
    """After the last segment the file must end (the reference writes nothing more)."""
    try:
        source.next_byte("")
    except CorruptStream:
        return
    raise CorruptStream(f"at byte {source.offset - 1}: data after the last coded segment (file damaged, or LM "
                        "probabilities differ from the writer's: other LM, torch thread count or torch build)")
