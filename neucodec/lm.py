"""Entropy-coding language model: the codes of step t-1 -> probabilities of the codes of step t.

The paper's small transformer (post-norm layers, sinusoidal positions, attention limited to
`past_context` steps), with the reference's parameter names so official LM checkpoints load as they
are. Inference streams with a cache of projected keys/values (the reference re-projects its cached
inputs every step) and runs a batch of independent sequences in one call per step.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig

Tensor = torch.Tensor

ROW_BLOCK = 8  # streaming matmuls run on at least this many rows, so results do not depend on B (see step)


def sin_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[..., 1] positions -> [..., dim]: cos then sin of p / max_period^(i / (dim/2 - 1))."""
    half = dim // 2
    adim = torch.arange(half, device=positions.device).view(1, 1, -1)
    phase = positions / (max_period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head attention holding `in_proj_weight/bias` and `out_proj` (nn.MultiheadAttention keys)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, D] -> q, k, v each [B, H, T, D/H]."""
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return tuple(t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
                     for t in qkv.chunk(3, dim=-1))  # type: ignore[return-value]

    def zero_token(self, batch: int) -> tuple[Tensor, Tensor]:
        """Keys/values of the all-zero token every sequence starts with: the projection biases."""
        D = self.out_proj.in_features
        _, bk, bv = self.in_proj_bias.chunk(3)
        shape = (batch, self.num_heads, 1, D // self.num_heads)
        return bk.view(1, self.num_heads, 1, -1).expand(shape), bv.view(1, self.num_heads, 1, -1).expand(shape)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, H, T, Dh = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


class TransformerLayer(nn.Module):
    """Post-norm layer: x = norm1(x + SA(x)); x = norm2(x + FF(x)), GELU feed-forward."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList([TransformerLayer(cfg.dim, cfg.num_heads, cfg.dim * cfg.hidden_scale)
                                     for _ in range(cfg.num_layers)])


@dataclasses.dataclass
class LMState:
    """Streaming state: per layer, projected keys/values of the last `past_context` inputs.

    `keys[i][:, :, start:end]` are the cached keys of layer i (the zero token first); the buffers
    have room for more, so a step writes in place instead of re-allocating the cache. A state
    is therefore consumed by `step`: keep using the returned one.
    """

    keys: list[Tensor]  # [B, H, capacity, Dh]
    values: list[Tensor]
    offset: int  # position of the next step
    batch: int  # B, rows of the caches
    start: int = 0
    end: int = 1
    weights: _StepWeights | None = None  # parameters gathered by the first `step`
    scratch: _Scratch | None = None  # buffers `step` writes into, made by the first `step`
    steps: int | None = None  # steps the buffers were sized for (`init_state`), None: any number


def _check_steps(state: LMState, n: int) -> None:
    if state.steps is not None and state.offset + n > state.steps:
        raise ValueError(f"LM state made for {state.steps} steps, asked for step {state.offset + n}")


@dataclasses.dataclass
class _StepWeights:
    """What `step` reads for K codebooks, gathered once per state instead of once per step."""

    K: int
    emb: Tensor  # [K * (card + 1), D] stacked embedding tables
    offsets: Tensor  # [K] row of each codebook's table in `emb`
    norm_w: Tensor
    norm_b: Tensor
    layers: list[tuple[Tensor, ...]]  # per layer; matrices as transposed views [in, out]
    head_w: Tensor  # [D, K * card], transposed
    head_b: Tensor
    eps: float  # of every LayerNorm


@dataclasses.dataclass
class _Scratch:
    """Buffers of `step` for Bp = max(ROW_BLOCK, B) rows, reused by every step of a state.

    Writing into them (`out=`, in-place ops) runs the very kernels the allocating forms run --
    the results are the same bits -- without fetching fresh memory every step.
    """

    index: Tensor  # [Bp, K] rows of `emb` to gather: the previous codes + 1 + offsets (padding: "none")
    gathered: Tensor  # [Bp, K, D]
    summed: Tensor  # [Bp, D]
    qkv: Tensor  # [Bp, 3 D]
    attended: Tensor  # [Bp, D], padding rows stay 0
    projected: Tensor  # [Bp, D]
    hidden: Tensor  # [Bp, FF]
    ff: Tensor  # [Bp, D]
    logits: Tensor  # [Bp, K * card]


class TiedHead(nn.Module):
    """Output head that reuses its codebook's input embedding as weights (only a bias of its own)."""

    def __init__(self, card: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(card))


class LanguageModel(nn.Module):
    """Per-codebook embeddings summed -> transformer -> per-codebook linear heads + softmax.

    With `cfg.tie_embeddings` a head's weights are its embedding table (without the "none" row),
    which halves the size of a model whose parameters sit mostly in embeddings and heads.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.linears = nn.ModuleList([TiedHead(cfg.card) if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.card)
                                      for _ in range(cfg.n_q)])
        if cfg.tie_embeddings:  # N(0, 1) tables as heads would start with wildly peaked predictions
            for table in self.emb:
                nn.init.normal_(table.weight, std=cfg.dim ** -0.5)

    def head_weight(self, k: int) -> Tensor:
        """[card, dim] weights of codebook k's output head."""
        head = self.linears[k]
        return self.emb[k].weight[1:] if isinstance(head, TiedHead) else head.weight

    def _embed(self, inputs: Tensor) -> Tensor:
        """inputs [B, K, T] (codes + 1, 0 = none) -> [B, T, D] normalised, with positions added later."""
        x = sum(self.emb[k](inputs[:, k]) for k in range(inputs.shape[1]))
        return self.transformer.norm_in(x)  # type: ignore[arg-type]

    def _logits(self, x: Tensor, K: int) -> Tensor:
        """[B, T, D] -> [B, K, T, card]."""
        return torch.stack([F.linear(x, self.head_weight(k), self.linears[k].bias) for k in range(K)], dim=1)

    def forward(self, codes: Tensor, offset: int = 0) -> Tensor:
        """Teacher-forced logits for every step: codes [B, K, T] -> logits [B, K, T, card].

        Step t sees codes[:, :, :t] only (and at most `past_context` of them), exactly as `step`.
        """
        B, K, T = codes.shape
        if K > self.cfg.n_q:
            raise ValueError(f"the LM models {self.cfg.n_q} codebooks, got {K}")
        inputs = torch.cat([codes.new_zeros(B, K, 1), codes[..., :-1] + 1], dim=-1)
        x = self._embed(inputs)
        positions = torch.arange(T, device=codes.device).view(1, -1, 1) + offset
        x = x + sin_embedding(positions, self.cfg.dim, self.cfg.max_period)
        # key j (0 = zero token, j >= 1 = input j - 1) is visible to query t iff 0 <= t + 1 - j <= past
        q_pos = torch.arange(T, device=codes.device).view(-1, 1) + 1
        k_pos = torch.arange(T + 1, device=codes.device).view(1, -1)
        delta = q_pos - k_pos
        mask = (delta >= 0) & (delta <= self.cfg.past_context)
        for layer in self.transformer.layers:
            attn = layer.self_attn
            q, k, v = attn.project(x)
            k0, v0 = attn.zero_token(B)
            a = attn.attend(q, torch.cat([k0, k], 2), torch.cat([v0, v], 2), mask)
            x = layer.feed_forward(layer.norm1(x + a))
        return self._logits(x, K)

    # ------------------------------------------------------------- streaming inference
    def _step_weights(self, K: int) -> _StepWeights:
        """Parameters used by `step` for K codebooks, gathered once per streaming state.

        The embedding tables and heads of the first K codebooks are stacked into single tensors,
        so a step does one gather and one matmul instead of K of each. Weights are kept as the
        transposed views `F.linear` passes to `addmm` (not copies: the same matmul calls).
        """
        with torch.no_grad():
            emb = torch.cat([e.weight for e in self.emb[:K]], 0).contiguous()
            head_w = torch.cat([self.head_weight(k) for k in range(K)], 0).contiguous()
            head_b = torch.cat([lin.bias for lin in self.linears[:K]], 0).contiguous()
        layers = [(ly.self_attn.in_proj_weight.t(), ly.self_attn.in_proj_bias, ly.self_attn.out_proj.weight.t(),
                   ly.self_attn.out_proj.bias, ly.norm1.weight, ly.norm1.bias, ly.linear1.weight.t(), ly.linear1.bias,
                   ly.linear2.weight.t(), ly.linear2.bias, ly.norm2.weight, ly.norm2.bias)
                  for ly in self.transformer.layers]
        norm = self.transformer.norm_in
        offsets = torch.arange(K, device=emb.device) * (self.cfg.card + 1)
        return _StepWeights(K, emb, offsets, norm.weight, norm.bias, layers, head_w.t(), head_b, norm.eps)

    def _position(self, offset: int) -> Tensor:
        """Sinusoidal embedding [1, D] of one streaming position, memoised."""
        table = self.__dict__.setdefault("_positions", {})
        device = self.transformer.norm_in.weight.device
        pos = table.get((offset, device))
        if pos is None:
            pos = sin_embedding(torch.full((1, 1, 1), offset, device=device), self.cfg.dim,
                                self.cfg.max_period).view(1, self.cfg.dim)
            if len(table) < 1 << 16:
                table[(offset, device)] = pos
        return pos

    def init_state(self, batch: int, steps: int | None = None) -> LMState:
        """Fresh streaming state for `batch` independent sequences (each starts at position 0).

        `steps`: how many steps the state will take at most, if known (a step beyond raises
        ValueError); a run shorter than twice the context then gets key/value buffers not much
        longer than that (less memory to touch, keys closer together), which it never moves.
        The attention kernel's results depend on the alignment of each sequence's keys in memory
        (measured: head size 25), so a buffer of capacity C for `2 * (past_context + 1)` keeps C
        congruent to it modulo 16: every sequence's keys start at the same address modulo 64
        bytes, whatever the head size, and the probabilities stay the same bits.
        """
        capacity = 2 * (self.cfg.past_context + 1)
        if steps is not None and steps + 1 < capacity:
            capacity = steps + 1 + (capacity - steps - 1) % 16
        keys, values = [], []
        for layer in self.transformer.layers:
            k0, v0 = layer.self_attn.zero_token(batch)
            k = k0.new_empty(batch, k0.shape[1], capacity, k0.shape[3])
            v = torch.empty_like(k)
            k[:, :, :1] = k0
            v[:, :, :1] = v0
            keys.append(k)
            values.append(v)
        return LMState(keys, values, 0, batch, 0, 1, steps=steps)

    def _weights_of(self, state: LMState, n_q: int) -> _StepWeights:
        """The state's gathered weights for K = n_q codebooks (gathered anew for another K)."""
        w = state.weights
        if w is None or w.K != n_q:
            w = state.weights = self._step_weights(n_q)
            state.scratch = None
        return w

    def _scratch(self, w: _StepWeights, rows: int) -> _Scratch:
        """Buffers for `rows` rows: all written before they are read, but `attended` (zero padding)."""
        D, K = self.cfg.dim, w.K
        new = w.emb.new_empty
        index = w.offsets.repeat(rows, 1)
        return _Scratch(index, new(rows, K, D), new(rows, D), new(rows, 3 * D), w.emb.new_zeros(rows, D),
                        new(rows, D), new(rows, self.cfg.dim * self.cfg.hidden_scale), new(rows, D),
                        new(rows, K * self.cfg.card))

    @torch.no_grad()
    def step(self, previous: Tensor | None, state: LMState, n_q: int,
             out: Tensor | None = None) -> tuple[Tensor, LMState]:
        """One streaming step for a batch of independent sequences.

        Matrix products run on at least `ROW_BLOCK` rows (padding a small batch with zero rows): from
        that many rows on, the CPU kernels give each row the same result whatever the number of
        rows, so a sequence's probabilities do not depend on which other sequences share its batch.

        Args:
            previous: codes of the previous step [B, K], or None at the first step (a code of -1
                also stands for "no previous frame").
            state: from `init_state` or the previous call (updated in place).
            n_q: K, the number of codebooks coded.
            out: optional float32 tensor [B, K, card] (C-contiguous) to write the probabilities to;
                without it they are written to a new tensor.
        Returns:
            probabilities [B, K, card] (float32 softmax) and the new state.
        """
        B = state.batch
        _, H, capacity, Dh = state.keys[0].shape
        D = H * Dh
        _check_steps(state, 1)
        w = self._weights_of(state, n_q)
        s = state.scratch
        if s is None:
            s = state.scratch = self._scratch(w, max(ROW_BLOCK, B))
        if previous is not None:
            s.index[:B] = previous.view(B, n_q)
            s.index[:B] += w.offsets + 1
        torch.index_select(w.emb, 0, s.index.view(-1), out=s.gathered.view(-1, D))
        x = F.layer_norm(torch.sum(s.gathered, 1, out=s.summed), (D,), w.norm_w, w.norm_b, w.eps)
        x += self._position(state.offset)
        start, end = state.start, state.end
        if end == capacity:  # move the window to the front of the buffers
            for buf in state.keys + state.values:
                buf[:, :, : end - start] = buf[:, :, start:end].clone()
            start, end = 0, end - start
        # Each operation is the one `F.linear`, `F.gelu` and `x + y` run, writing into the scratch
        # buffers: the same kernels, the same bits (sums are formed in place as `y + x`; float
        # addition is commutative).
        sdpa, addmm, layer_norm, gelu_ = F.scaled_dot_product_attention, torch.addmm, F.layer_norm, torch._C._nn.gelu_
        qkv = s.qkv[:B].view(B, 3, H, 1, Dh)
        q, k_new, v_new = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        attended = s.attended[:B].view(B, H, 1, Dh)
        for (in_w, in_b, out_w, out_b, n1_w, n1_b, l1_w, l1_b, l2_w, l2_b, n2_w, n2_b), k_buf, v_buf in zip(
                w.layers, state.keys, state.values):
            addmm(in_b, x, in_w, out=s.qkv)
            k_buf[:, :, end: end + 1] = k_new
            v_buf[:, :, end: end + 1] = v_new
            attended.copy_(sdpa(q, k_buf[:, :, start: end + 1], v_buf[:, :, start: end + 1]))
            x = layer_norm(addmm(out_b, s.attended, out_w, out=s.projected).add_(x), (D,), n1_w, n1_b, w.eps)
            gelu_(addmm(l1_b, x, l1_w, out=s.hidden))
            x = layer_norm(addmm(l2_b, s.hidden, l2_w, out=s.ff).add_(x), (D,), n2_w, n2_b, w.eps)
        end += 1
        start = max(start, end - self.cfg.past_context)
        addmm(w.head_b, x, w.head_w, out=s.logits)
        logits = s.logits[:B].view(B, n_q, self.cfg.card)
        probs = torch.softmax(logits, -1) if out is None else torch.softmax(logits, -1, out=out)
        state.offset, state.start, state.end = state.offset + 1, start, end
        return probs, state
