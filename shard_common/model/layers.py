"""Plain tensor code for one Llama-family transformer block (gpt-fast style).

A block works on a ragged batch: the hidden states of every session's new tokens are
concatenated along the first axis ([T, d_model]); the projections run once over all of them.
Attention reads every session's keys from the span's paged KV pool: sessions with a few new rows
(decode, speculative verification) in one gather and one matmul pair per group, long prefill
chunks per session.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_batch import Group, KVBatch, PrefillRead
from .linear import make_linear
from .qtensor import QTensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Normalise in fp32 (the residual stream's dtype) and hand the matmuls ``out_dtype``. torch's
    fused op (one call instead of six; bit-identical here) when the weight spans the last axis;
    Qwen 3's per-head q|k weights broadcast over more than that."""
    xf = x.float()
    width = (x.shape[-1],)
    if weight.shape == width:
        return F.rms_norm(xf, width, weight, eps).to(out_dtype)
    return (F.rms_norm(xf, width, None, eps) * weight).to(out_dtype)


class RotaryTable:
    """cos/sin for half-split RoPE, looked up once per forward for all blocks. The sign of the
    rotation is folded into ``sin`` so applying it costs no negation. The table grows with the
    positions actually used (doubling), up to ``max_positions``: a 32k-context model with 256-wide
    heads would otherwise hold 34 MB per table whatever its sessions' lengths."""

    INITIAL_POSITIONS = 4096

    def __init__(self, head_dim: int, base: float, max_positions: int, dtype: torch.dtype, device: torch.device):
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self.dtype, self.device = dtype, device
        self._build(min(max_positions, self.INITIAL_POSITIONS))

    def _build(self, n: int) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
        self.cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype=self.dtype, device=self.device)
        self.sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype=self.dtype, device=self.device)

    def lookup(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``end``: one past the largest position in ``positions``."""
        if end > len(self.cos):
            self._build(min(self.max_positions, max(end, 2 * len(self.cos))))
        # [T, 1, head_dim] so they broadcast over heads.
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for [T, heads, head_dim] with the signed ``sin`` above (the
    halves swapped by one roll). In bf16, as the model has always run: RoPE in fp32, or with
    addcmul's single rounding, is as exact and moved the small model's greedy answers at
    near-ties (docs/benchmarks.md), which every client and Scout would see."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def fused_linear(parts: list[QTensor], biases: list[QTensor | None], device, dtype, dense: bool, name: str):
    """One layer computing several projections of the same input (q|k|v, gate|up): one kernel
    call instead of several, which matters because decode at batch 1 is dominated by op overhead."""
    weight = QTensor.concat_rows(parts)
    bias = None
    if any(b is not None for b in biases):
        bias = QTensor.from_dense(
            torch.cat([b.dequantize() if b is not None else torch.zeros(p.rows) for p, b in zip(parts, biases)])
        )
    return make_linear(weight, bias, device, dtype, dense=dense, name=name)


class Block(torch.nn.Module):
    """``native``: the compiled block operations (``native/``), or None for eager torch ops."""

    def __init__(self, config: ModelConfig, tensors: dict[str, QTensor], device, dtype, dense: bool, index: int, native=None):
        super().__init__()
        self.config = config
        self.index = index
        self.native = native
        name = f"blk.{index}"
        self.attn_norm = tensors["attn_norm"].dequantize().to(device)
        self.ffn_norm = tensors["ffn_norm"].dequantize().to(device)
        # Qwen 3: one RMSNorm weight per head dim for q and one for k, stacked per head so a
        # single op normalises the fused q|k heads.
        self.qk_norm = None
        if config.qk_norm:
            q_norm, k_norm = tensors["attn_q_norm"].dequantize(), tensors["attn_k_norm"].dequantize()
            self.qk_norm = torch.cat([q_norm.expand(config.n_heads, -1), k_norm.expand(config.n_kv_heads, -1)]).to(device)
        qkv = [tensors["attn_q"], tensors["attn_k"], tensors["attn_v"]]
        if len({t.qtype for t in qkv}) == 1:
            self.qkv = fused_linear(qkv, [tensors.get(f"{n}.bias") for n in ("attn_q", "attn_k", "attn_v")], device, dtype, dense, name)
        else:
            self.qkv = ConcatLinear([
                make_linear(tensors[n], tensors.get(f"{n}.bias"), device, dtype, dense, name) for n in ("attn_q", "attn_k", "attn_v")
            ])
        self.wo = make_linear(tensors["attn_output"], None, device, dtype, dense, name)
        gate_up = [tensors["ffn_gate"], tensors["ffn_up"]]
        if gate_up[0].qtype == gate_up[1].qtype:
            self.gate_up = fused_linear(gate_up, [None, None], device, dtype, dense, name)
        else:
            self.gate_up = ConcatLinear([make_linear(t, None, device, dtype, dense, name) for t in gate_up])
        self.down = make_linear(tensors["ffn_down"], None, device, dtype, dense, name)
        # Gemma 3: the attention output and the MLP output are normalised again before the residual add.
        self.post_attn_norm = self.post_ffw_norm = None
        if config.post_norms:
            self.post_attn_norm = tensors["post_attention_norm"].dequantize().to(device)
            self.post_ffw_norm = tensors["post_ffw_norm"].dequantize().to(device)
        self.window = config.sliding_window if config.is_sliding(index) else 0
        self.rope_base = config.rope_base_of(index)  # which of the span's RoPE tables this block uses
        self.activation = partial(F.gelu, approximate="tanh") if config.activation == "gelu_tanh" else F.silu
        self.group = config.n_heads // config.n_kv_heads
        self.scale = config.attn_scale
        self.act_dtype = dtype

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: KVBatch) -> torch.Tensor:
        """q [T, n_heads, hd] (already scaled by 1/sqrt(hd)), k/v [T, n_kv_heads, hd] in the cache's
        dtype; returns [T, q_dim] in the cache's dtype."""
        cfg = self.config
        store, within = batch.store(layer)
        keys_all, values_all = store.k[within], store.v[within]  # [hkv, slots, hd]
        slots = batch.writes(layer)
        keys_all.index_copy_(1, slots, k.transpose(0, 1))
        values_all.index_copy_(1, slots, v.transpose(0, 1))
        reads = batch.reads(layer, self.window)
        if len(reads.groups) == 1 and reads.groups[0].rows is None:
            return self._grouped(q, keys_all, values_all, reads.groups[0])
        out = q.new_empty(q.shape[0], cfg.q_dim)
        for group in reads.groups:
            out.index_copy_(0, group.rows, self._grouped(q.index_select(0, group.rows), keys_all, values_all, group))
        for p in reads.prefill:
            out[p.row:p.row + p.n] = self._prefill(q, keys_all, values_all, p)
        return out

    def _prefill(self, q: torch.Tensor, keys_all: torch.Tensor, values_all: torch.Tensor, p: PrefillRead) -> torch.Tensor:
        """A long chunk of one session's rows through SDPA: [n, q_dim] in the cache's dtype.
        Grouped-query attention without repeating K/V: the query heads sharing one KV head are
        stacked along the sequence axis, so SDPA sees hkv heads of g*n queries."""
        cfg = self.config
        hkv, hd, g, n = cfg.n_kv_heads, cfg.head_dim, self.group, p.n
        qs = q[p.row:p.row + n].view(n, hkv, g, hd).permute(1, 2, 0, 3).reshape(hkv, g * n, hd)
        o = F.scaled_dot_product_attention(qs, keys_all.index_select(1, p.index), values_all.index_select(1, p.index),
                                           attn_mask=p.mask, scale=1.0)
        return o.view(hkv, g, n, hd).permute(2, 0, 1, 3).reshape(n, cfg.q_dim)

    def _grouped(self, q: torch.Tensor, keys_all: torch.Tensor, values_all: torch.Tensor, group: Group) -> torch.Tensor:
        """A few rows per session, every session of the group in one gather and one matmul pair:
        per KV head and session, a matrix of its rows × the g query heads sharing that KV head
        (plain matmuls beat SDPA's dispatch for so few query rows)."""
        cfg = self.config
        hkv, hd, g, b, n, width = cfg.n_kv_heads, cfg.head_dim, self.group, group.size, group.n, group.keys
        qs = q.view(b, n, hkv, g, hd).permute(2, 0, 1, 3, 4).reshape(hkv * b, n * g, hd)
        if group.run is not None:  # one session whose keys lie in consecutive slots: a view, no gather
            keys, values = keys_all[:, group.run:group.run + width], values_all[:, group.run:group.run + width]
        else:
            keys = keys_all.index_select(1, group.index).view(hkv * b, width, hd)
            values = values_all.index_select(1, group.index).view(hkv * b, width, hd)
        scores = torch.baddbmm(group.mask, qs, keys.transpose(1, 2))
        out = torch.bmm(torch.softmax(scores, dim=-1), values)
        return out.view(hkv, b, n, g, hd).permute(1, 2, 0, 3, 4).reshape(b * n, cfg.q_dim)

    def forward(self, h: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        """``h`` is the fp32 residual stream [T, d_model]. Only matmul inputs drop to the activation
        dtype: a bf16 residual stream loses enough over 30 blocks to flip near-tied tokens."""
        if self.native is not None:
            return self._forward_native(h, layer, cos, sin, batch)
        cfg = self.config
        t = h.shape[0]
        qkv = self.qkv(rms_norm(h, self.attn_norm, cfg.norm_eps, self.act_dtype))
        # q and k share one RoPE application: they are adjacent columns of the fused projection.
        qk = qkv[:, : cfg.q_dim + cfg.kv_dim].view(t, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, cfg.norm_eps, qk.dtype)
        kv_dtype = batch.pool.dtype
        qk = apply_rope(qk, cos, sin).to(kv_dtype)
        # Scaled here, not as the score matmul's alpha (an op fewer): that rounding moved answers.
        q = qk[:, : cfg.n_heads] * self.scale
        k = qk[:, cfg.n_heads:]
        v = qkv[:, cfg.q_dim + cfg.kv_dim:].view(t, cfg.n_kv_heads, cfg.head_dim).to(kv_dtype)
        attn = self.wo(self.attention(q, k, v, layer, batch).to(self.act_dtype))
        if self.post_attn_norm is not None:
            attn = rms_norm(attn, self.post_attn_norm, cfg.norm_eps, torch.float32)
        h = h + attn
        gate, up = self.gate_up(rms_norm(h, self.ffn_norm, cfg.norm_eps, self.act_dtype)).split([cfg.ffn_dim, cfg.ffn_dim], dim=-1)
        out = self.down(self.activation(gate) * up)
        if self.post_ffw_norm is not None:
            out = rms_norm(out, self.post_ffw_norm, cfg.norm_eps, torch.float32)
        return h + out

    def _forward_native(self, h: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        """The same block with the operations between the matmuls in the native kernels: a handful
        of calls instead of ~150 torch ops. Norms, RoPE, the conversions, the residual adds and the
        activation round as the eager path does; decode attention sums in another order."""
        cfg, ops = self.config, self.native
        qkv = self.qkv(ops.rms_norm(h, self.attn_norm, cfg.norm_eps, True))
        qk_normed = None
        if self.qk_norm is not None:
            qk = qkv[:, : cfg.q_dim + cfg.kv_dim].view(h.shape[0], cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
            qk_normed = ops.rms_norm(qk, self.qk_norm, cfg.norm_eps, True)
        store, within = batch.store(layer)
        q = ops.rope_to_cache(qkv, qk_normed, cos, sin, self.scale, cfg.n_heads, cfg.n_kv_heads, store.k, store.v, within,
                              batch.writes(layer))
        reads = batch.row_keys(layer, self.window)
        out = ops.attend(q, store.k, store.v, within, reads.rows, reads.slots, reads.begin, reads.count)
        if reads.prefill:
            keys_all, values_all = store.k[within], store.v[within]
            for p in reads.prefill:
                out[p.row:p.row + p.n] = self._prefill(q, keys_all, values_all, p)
        attn = self.wo(out)
        if self.post_attn_norm is not None:
            attn = ops.rms_norm(attn, self.post_attn_norm, cfg.norm_eps, False)
        h, x = ops.add_rms_norm(h, attn, self.ffn_norm, cfg.norm_eps)
        out = self.down(ops.act_mul(self.gate_up(x), cfg.activation == "gelu_tanh"))
        if self.post_ffw_norm is not None:
            out = ops.rms_norm(out, self.post_ffw_norm, cfg.norm_eps, False)
        return h + out


class ConcatLinear(torch.nn.Module):
    """Projections whose weights have different storage types, so they cannot share one kernel."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)
