"""The flow-matching estimator: a DiT over 50 Hz mel frames (the reference's ``DiT``).

Input channels are ``[x, mu, speaker, cond]`` (4 x 80 = 320) -> ``in_proj`` -> ``depth``
blocks -> final adaLN layer -> 80. The time step is embedded sinusoidally on ``t*1000``
(256-d, cos then sin) and passed through an MLP; each block derives 9 adaLN-Zero
vectors from it: shift/scale/gate for attention (QK-LayerNorm, SDPA), for a causal conv
block (causal conv k=3, LayerNorm, Mish, causal conv k=3) and for a GELU-tanh MLP, applied
in the order attention, conv, MLP. There is no positional encoding: the causal convs are
the only source of order, so attention is permutation-invariant over its keys.

Streaming (``forward_chunk_into``): every block keeps a K/V cache and a conv cache per
sequence, in buffers the caller owns. The new chunk's keys come FIRST, then the cached
ones (the reference's ``torch.cat([k, k_cache])``); that order matters to the reference's
cache trimming (see ``flow.py``). Batched streams of unequal lengths are right-padded:
each stream attends over its own keys only, and ``lengths`` marks the real chunk frames
for the conv caches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.token2wav.config import DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.dim = frequency_embedding_size
        self.scale = 1000

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half) / half).to(t)
        args = (t * self.scale)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _qkv(self, x):
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(x)))
        return q, k, self._heads(self.to_v(x))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, T, C]``; mask ``[B, T, T]`` or ``[B, 1, T]`` bool (True = attend)."""
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.unsqueeze(1))
        return self._out(o)

    def forward_chunk_into(self, x: torch.Tensor, k_slot, v_slot, new_lens: list[int] | None = None
                           ) -> torch.Tensor:
        """One chunk ``x`` ``[B, t, C]`` with the caches in caller-owned buffers:
        ``k_slot``/``v_slot`` ``[B, H, t+T, hd]`` (views; only the last dim need be
        contiguous) hold the T cached frames after their first t, which receive this
        chunk's keys/values. Same keys in the same order as ``torch.cat([k, k_cache])``,
        so the attention is bit-identical, without copying the cache.

        Batched streams with their own caches: ``k_slot``/``v_slot`` are LISTS with one
        view ``[B/n, H, t_i+T_i, hd]`` per stream and ``new_lens[i]`` = t_i (the chunk may
        be right-padded to t). Each stream's rows attend to exactly its own keys: no
        padded cache copy, no mask; padded query rows give unused outputs."""
        q, k, v = self._qkv(x)
        t = k.shape[2]
        if isinstance(k_slot, (list, tuple)):
            g = q.shape[0] // len(k_slot)
            outs = []
            for i, (ks, vs) in enumerate(zip(k_slot, v_slot)):
                r = slice(g * i, g * i + g)
                ti = t if new_lens is None else new_lens[i]
                ks[:, :, :ti].copy_(k[r, :, :ti])
                vs[:, :, :ti].copy_(v[r, :, :ti])
                outs.append(F.scaled_dot_product_attention(q[r], ks, vs))
            return self._out(torch.cat(outs))
        k_slot[:, :, :t].copy_(k)
        v_slot[:, :, :t].copy_(v)
        return self._out(F.scaled_dot_product_attention(q, k_slot, v_slot))


class CausalConvBlock(nn.Module):
    """causal conv k -> LayerNorm -> Mish -> causal conv k, on ``[B, T, C]``.

    Parameter names follow the reference's ``nn.Sequential`` (indices 1, 3 and 6)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels = channels
        self.pad = kernel_size - 1
        self.block = nn.ModuleDict({
            "1": nn.Conv1d(channels, channels, kernel_size),
            "3": nn.LayerNorm(channels),
            "6": nn.Conv1d(channels, channels, kernel_size),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block["1"](F.pad(x.transpose(1, 2), (self.pad, 0))).transpose(1, 2)
        y = F.mish(self.block["3"](y))
        return self.block["6"](F.pad(y.transpose(1, 2), (self.pad, 0))).transpose(1, 2)

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None, lengths: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """cache ``[B, 2C, k-1]`` (conv1 inputs then conv2 inputs). With ``lengths`` (real
        frames per row of a right-padded batch) the new cache is taken before the padding."""
        b = x.shape[0]
        if cache is None:
            c1 = c2 = x.new_zeros(b, self.channels, self.pad)
        else:
            c1, c2 = cache.split((self.channels, self.channels), dim=1)
        h = torch.cat([c1, x.transpose(1, 2)], dim=2)
        new1 = self._tail(h, lengths)
        y = self.block["1"](h).transpose(1, 2)
        y = F.mish(self.block["3"](y))
        h = torch.cat([c2, y.transpose(1, 2)], dim=2)
        new2 = self._tail(h, lengths)
        y = self.block["6"](h).transpose(1, 2)
        return y, torch.cat([new1, new2], dim=1)

    def _tail(self, h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return h[..., -self.pad:]
        idx = lengths.view(-1, 1) + torch.arange(self.pad, device=h.device).view(1, -1)   # [B, pad]
        return torch.gather(h, 2, idx[:, None, :].expand(-1, h.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden, int(hidden * mlp_ratio))
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.conv = CausalConvBlock(hidden, 3)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 9 * hidden))

    def forward(self, x, c, mask=None):
        return self.forward_mods(x, self.modulations(c), mask)

    def forward_mods(self, x, mods, mask=None):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask)
        x = x + gate_conv * self.conv(modulate(self.norm3(x), shift_conv, scale_conv))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The 9 adaLN vectors; they depend on the time step only (see :meth:`DiT.modulations`)."""
        return self.adaLN_modulation(c).chunk(9, dim=-1)

    def forward_chunk_into(self, x, mods, k_slot, v_slot, cnn_cache, lengths=None, new_lens=None):
        """One streaming chunk with precomputed ``mods`` and in-place K/V slots
        (:meth:`Attention.forward_chunk_into`); returns x and the new conv cache."""
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = mods
        a = self.attn.forward_chunk_into(modulate(self.norm1(x), shift_msa, scale_msa), k_slot, v_slot, new_lens)
        x = x + gate_msa * a
        cv, new_cnn = self.conv.forward_chunk(modulate(self.norm3(x), shift_conv, scale_conv), cnn_cache, lengths)
        x = x + gate_conv * cv
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, new_cnn


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(2, dim=-1)

    def forward(self, x, c, mods=None):
        shift, scale = self.modulations(c) if mods is None else mods
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.in_proj = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.out_channels)
        self._mod_cache: dict = {}
        self._mod_params: list[torch.Tensor] | None = None

    def modulations(self, t: torch.Tensor, key=None) -> list:
        """All adaLN vectors for time steps ``t`` ``[B]``: one tuple per block, then the
        final layer's. They depend on t only (not on the frames), so the solvers, whose
        time steps are fixed, compute them once per (``key``, batch, device, dtype) and
        reuse them for every chunk: the same arithmetic on the same inputs, so the same
        values, without re-reading the 37.7 M adaLN weights 10 times per chunk. The cache
        is dropped when any parameter changes (version counters) and is not used while
        autograd records."""
        if key is None or torch.is_grad_enabled():
            return self._modulations(t)
        if self._mod_params is None:
            self._mod_params = list(self.t_embedder.parameters()) + [p for b in self.blocks for p in
                                                                     b.adaLN_modulation.parameters()] + list(
                self.final_layer.adaLN_modulation.parameters())
        sig = tuple(p._version for p in self._mod_params) + tuple(p.data_ptr() for p in self._mod_params[:1])
        k = (key, t.shape[0], t.device, t.dtype)
        hit = self._mod_cache.get(k)
        if hit is not None and hit[0] == sig:
            return hit[1]
        if self._mod_cache and next(iter(self._mod_cache.values()))[0] != sig:
            self._mod_cache.clear()
        mods = self._modulations(t)
        if len(self._mod_cache) > 256:
            self._mod_cache.clear()
        self._mod_cache[k] = (sig, mods)
        return mods

    def _modulations(self, t: torch.Tensor) -> list:
        c = self.t_embedder(t).unsqueeze(1)
        return [b.modulations(c) for b in self.blocks] + [self.final_layer.modulations(c)]

    @staticmethod
    def _inputs(x, mu, spks, cond):
        spks = spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x, mu, spks, cond], dim=1).transpose(1, 2)

    def forward(self, x, mu, t, spks, cond, mask=None):
        """x, mu, cond ``[B, 80, T]``; t ``[B]``; spks ``[B, 80]``; mask ``[B, T, T]`` or
        ``[B, 1, T]`` bool or None -> velocity ``[B, 80, T]``."""
        c = self.t_embedder(t).unsqueeze(1)
        h = self.in_proj(self._inputs(x, mu, spks, cond))
        for block in self.blocks:
            h = block(h, c, mask)
        return self.final_layer(h, c).transpose(1, 2)

    def forward_cached(self, x, mu, t, spks, cond, mask=None, mod_key=None):
        """:meth:`forward` with the adaLN vectors from :meth:`modulations`."""
        mods = self.modulations(t, mod_key)
        h = self.in_proj(self._inputs(x, mu, spks, cond))
        for block, m in zip(self.blocks, mods):
            h = block.forward_mods(h, m, mask)
        return self.final_layer(h, None, mods[-1]).transpose(1, 2)

    def forward_chunk_into(self, x, mu, t, spks, cond, k_slots, v_slots, cnn_cache=None, lengths=None,
                           mod_key=None, new_lens=None):
        """One chunk ``[B, 80, t]`` with caller-owned K/V buffers: ``k_slots[i]``/``v_slots[i]``
        ``[B, H, t+T, hd]`` for block i (first t frames written here, the cache after
        them), or per-stream lists of them (:meth:`Attention.forward_chunk_into`); cnn_cache
        ``[depth, B, 2*hidden, 2]`` or None. Returns the velocity and the new conv cache."""
        mods = self.modulations(t, mod_key)
        h = self.in_proj(self._inputs(x, mu, spks, cond))
        new_cnn = []
        for i, block in enumerate(self.blocks):
            h, cv = block.forward_chunk_into(h, mods[i], k_slots[i], v_slots[i],
                                             None if cnn_cache is None else cnn_cache[i], lengths, new_lens)
            new_cnn.append(cv)
        return self.final_layer(h, None, mods[-1]).transpose(1, 2), torch.stack(new_cnn)
