"""Qwen2 decoder (spec §1.7) with a slot-based KV cache for incremental generation.

Parameter names follow the checkpoint (spec §5.3): ``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj`` ... ``model.norm``; ``lm_head`` is untied.
Numerics follow transformers' Qwen2 (RMSNorm in fp32, RoPE, SwiGLU, softmax in fp32).

One forward, :meth:`Qwen2Model.forward`, serves prefill, chunked prefill and decode:
every row of a batch appends ``n_i`` new tokens to its cache slot after the ``L_i``
tokens already there, and attends causally to all ``L_i + n_i``. Decode is ``n_i = 1``
for every row. Rows are independent (own slot, own length), so sequences join and
leave the running batch between steps, which is what a continuous-batching engine needs.
Per-token cost is O(context) for attention only: nothing is recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.config import TextConfig
from stepaudio2.runtime.errors import ResourceExhausted


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class KVCache:
    """Keys and values of up to ``num_slots`` sequences, one slot per sequence.

    Storage is [layers, slots, kv_heads, capacity, head_dim] for K and for V. Capacity
    grows by doubling (amortised O(1) per token) up to ``max_len``; a slot's contents
    are ``[:length]``. Allocation hands out the lowest free slot so a running batch
    tends to be a contiguous range (read without a gather).
    """

    def __init__(self, cfg: TextConfig, num_slots: int, *, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 256, max_len: int | None = None):
        self.cfg = cfg
        self.num_slots = num_slots
        self.max_len = max_len or cfg.max_position_embeddings
        self.capacity = min(capacity, self.max_len)
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots))

    # -- slots ---------------------------------------------------------------------
    def allocate(self) -> int:
        if not self._free:
            raise ResourceExhausted(f"all {self.num_slots} KV-cache slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything after ``length`` tokens (e.g. to reuse a shared prefix)."""
        if length > self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens, cannot truncate to {length}")
        self.lengths[slot] = length

    def _ensure(self, needed: int) -> None:
        if needed > self.max_len:
            raise ResourceExhausted(f"sequence of {needed} tokens exceeds the context limit of {self.max_len}")
        if needed <= self.capacity:
            return
        cap = self.capacity
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (cap,) + old.shape[4:])
            new[:, :, :, : self.capacity] = old
            setattr(self, name, new)
        self.capacity = cap


@dataclass
class _StepPlan:
    """Index bookkeeping shared by all layers of one forward."""

    slots: torch.Tensor        # [B]
    contiguous: slice | None   # slots as a slice when they are consecutive and ascending
    write_slot: torch.Tensor   # [N] slot of each new token
    write_pos: torch.Tensor    # [N] position of each new token
    write_row: torch.Tensor    # [N] batch row of each new token
    write_col: torch.Tensor    # [N] column (0..n_i-1) of each new token
    total: int                 # keys to attend: max(L_i + n_i)
    mask: torch.Tensor         # [B, 1, n_max, total] bool, True = attend
    cos: torch.Tensor          # [B, n_max, head_dim]
    sin: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.h, self.kv, self.hd = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=True)
        self.k_proj = nn.Linear(d, kv * hd, bias=True)
        self.v_proj = nn.Linear(d, kv * hd, bias=True)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, plan: _StepPlan) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.h, self.hd)
        k = self.k_proj(x).view(b, n, self.kv, self.hd)
        v = self.v_proj(x).view(b, n, self.kv, self.hd)
        cos, sin = plan.cos[:, :, None, :], plan.sin[:, :, None, :]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Write the new keys/values of the real (unpadded) tokens into their slots.
        ck, cv = cache.k[layer], cache.v[layer]            # [slots, kv, cap, hd]
        ck[plan.write_slot, :, plan.write_pos] = k[plan.write_row, plan.write_col]
        cv[plan.write_slot, :, plan.write_pos] = v[plan.write_row, plan.write_col]
        if plan.contiguous is not None:
            keys, values = ck[plan.contiguous, :, : plan.total], cv[plan.contiguous, :, : plan.total]
        else:
            keys = ck.index_select(0, plan.slots)[:, :, : plan.total]
            values = cv.index_select(0, plan.slots)[:, :, : plan.total]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=plan.mask,
                                             enable_gqa=self.h != self.kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, layer, cache, plan):
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _plan(self, cache: KVCache, slots: list[int], new_lens: list[int], n_max: int,
              dtype: torch.dtype, device: torch.device) -> _StepPlan:
        starts = [cache.lengths[s] for s in slots]
        ends = [a + n for a, n in zip(starts, new_lens)]
        total = max(ends)
        cache._ensure(total)
        rows, cols, wslot, wpos = [], [], [], []
        for r, (s, a, n) in enumerate(zip(slots, starts, new_lens)):
            rows += [r] * n
            cols += range(n)
            wslot += [s] * n
            wpos += range(a, a + n)
        starts_t = torch.tensor(starts, device=device)
        lens_t = torch.tensor(new_lens, device=device)
        j = torch.arange(n_max, device=device)
        qpos = starts_t[:, None] + j[None, :]                                  # [B, n_max]
        kpos = torch.arange(total, device=device)
        mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < (starts_t + lens_t)[:, None, None])
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, self.cfg.head_dim, 2, device=device,
                                                               dtype=torch.float32) / self.cfg.head_dim))
        freqs = qpos.float()[:, :, None] * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        contiguous = None
        if slots == list(range(slots[0], slots[0] + len(slots))):
            contiguous = slice(slots[0], slots[0] + len(slots))
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return _StepPlan(t(slots), contiguous, t(wslot), t(wpos), t(rows), t(cols), total,
                         mask[:, None], emb.cos().to(dtype), emb.sin().to(dtype))

    def forward(self, embeds: torch.Tensor, new_lens: list[int], cache: KVCache, slots: list[int]) -> torch.Tensor:
        """embeds [B, n_max, D] (right-padded) -> final hidden states [B, n_max, D].

        Appends ``new_lens[i]`` tokens to ``slots[i]``; advances ``cache.lengths``.
        """
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate slots in one batch: {slots}")
        plan = self._plan(cache, slots, new_lens, embeds.shape[1], embeds.dtype, embeds.device)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, plan)
        for s, n in zip(slots, new_lens):
            cache.lengths[s] += n
        return self.norm(x)
