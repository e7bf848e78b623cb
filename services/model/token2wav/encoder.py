"""The flow model's token encoder (the reference's ``UpsampleConformerEncoderV2``).

Token embeddings (512) -> linear input layer (Linear + LayerNorm, times sqrt(d)) ->
``PreLookaheadLayer`` (conv k=lookahead+1 over the next 3 tokens, then a causal conv
k=3, residual) -> ``num_blocks`` pre-norm transformer blocks with espnet relative
positions (rel-pos self-attention with ``pos_bias_u``/``pos_bias_v``, swish FFN) ->
``Upsample1D`` (nearest x2, causal conv k=5) -> a second linear input layer ->
``num_up_blocks`` more blocks -> ``after_norm``. Parameter names equal the checkpoint's.

Two ways to run it, as in the reference:
* :meth:`UpsampleEncoder.forward`: a whole sequence, zero lookahead padding at the end,
  full attention (optionally an explicit boolean mask ``[B, T, T]`` over token frames).
* :meth:`UpsampleEncoder.forward_chunk`: one streaming chunk; the chunk's last
  ``pre_lookahead_len`` tokens are lookahead only (stripped from the output) unless
  ``last`` is set, in which case zero lookahead is appended. No attention mask: the chunk
  attends to every cached frame and to all of itself. The caches are returned, never
  kept here, so one module serves any number of streams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.token2wav.config import EncoderConfig


def espnet_rel_pos_table(length: int, d_model: int) -> torch.Tensor:
    """espnet's relative position table ``[1, 2*length-1, d_model]``.

    Row ``length-1-r`` encodes relative position ``r`` (query minus key): positive
    distances first (flipped), then negative ones. Built in fp32 exactly as the reference
    builds it (sin/cos of ``position * exp(arange(0, d, 2) * -(ln 1e4 / d))``).
    """
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pos = torch.zeros(length, d_model)
    neg = torch.zeros(length, d_model)
    pos[:, 0::2] = torch.sin(position * div_term)
    pos[:, 1::2] = torch.cos(position * div_term)
    neg[:, 0::2] = torch.sin(-1 * position * div_term)
    neg[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0).unsqueeze(0)


class RelPositionTable:
    """Cached espnet table; :meth:`get` returns the centred ``[1, 2*size-1, d]`` slice."""

    def __init__(self, d_model: int):
        self.d_model = d_model
        self._table: torch.Tensor | None = None
        self._len = 0

    def get(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if size > self._len or self._table is None or self._table.device != device or self._table.dtype != dtype:
            n = max(size, 5000, self._len)      # the reference pre-computes 5000 positions
            self._table = espnet_rel_pos_table(n, self.d_model).to(device=device, dtype=dtype)
            self._len = n
        centre = self._len - 1
        return self._table[:, centre - size + 1: centre + size]


def rel_shift(bd: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, 2K-1]`` position scores -> ``[B, H, L, K]``.

    Query ``a`` (absolute position ``K-L+a``) against key ``b`` takes the table row of
    relative distance ``(K-L+a) - b``, i.e. column ``L-1-a+b``: the same selection as
    Transformer-XL's pad-and-reshape trick that the reference applies (valid for L <= K).
    """
    length, width = bd.shape[-2], bd.shape[-1]
    keys = (width + 1) // 2
    a = torch.arange(length, device=bd.device).unsqueeze(1)
    b = torch.arange(keys, device=bd.device).unsqueeze(0)
    idx = (length - 1 - a + b).expand(*bd.shape[:-2], length, keys)
    return torch.gather(bd, -1, idx)


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with espnet relative positions (Transformer-XL u/v biases)."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention width {n_feat} is not divisible by {n_head} heads")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, cache: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, L, D]``; pos_emb ``[1, 2K-1, D]`` with K = cached + L; cache
        ``[B, H, Tc, 2*d_k]`` (keys then values, oldest first); mask ``[B, L, K]`` bool
        (True = attend) or None. Returns the output and the new cache ``[B, H, K, 2*d_k]``."""
        b, length, _ = x.shape
        q = self.linear_q(x).view(b, length, self.h, self.d_k)
        k = self.linear_k(x).view(b, length, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, length, self.h, self.d_k).transpose(1, 2)
        if cache is not None and cache.shape[2] > 0:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)

        p = self.linear_pos(pos_emb).view(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        bd = torch.matmul(q_v, p.transpose(-2, -1))
        if ac.shape != bd.shape:
            bd = rel_shift(bd)
        scores = (ac + bd) / math.sqrt(self.d_k)
        if mask is not None:
            blocked = ~mask.unsqueeze(1)
            attn = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, length, self.h * self.d_k)
        return self.linear_out(out), new_cache


class FeedForward(nn.Module):
    def __init__(self, idim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + MHA(LN(x)); x + FFN(LN(x)) (the reference's ConformerEncoderLayer
    with neither macaron FFN nor conv module)."""

    def __init__(self, size: int, heads: int, linear_units: int, key_bias: bool):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(heads, size, key_bias)
        self.feed_forward = FeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x, pos_emb, cache=None, mask=None):
        att, new_cache = self.self_attn(self.norm_mha(x), pos_emb, cache, mask)
        x = x + att
        x = x + self.feed_forward(self.norm_ff(x))
        return x, new_cache


class LinearInput(nn.Module):
    """Linear + LayerNorm, then scaled by sqrt(d) (espnet rel-pos input scaling)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class PreLookaheadLayer(nn.Module):
    def __init__(self, channels: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence ``[B, T, C]``: zero lookahead after the end, zero history before."""
        y = F.pad(x.transpose(1, 2).contiguous(), (0, self.pre_lookahead_len))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2).contiguous() + x

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, t, C]`` whose last ``pre_lookahead_len`` frames are lookahead only ->
        ``[B, t - lookahead, C]``; cache = the last 2 conv1 outputs ``[B, C, 2]``."""
        y = F.leaky_relu(self.conv1(x.transpose(1, 2).contiguous()))
        if cache is None:
            cache = y.new_zeros(y.shape[0], y.shape[1], 2)
        new_cache = y[..., -2:]
        y = self.conv2(torch.cat([cache, y], dim=2))
        return y.transpose(1, 2).contiguous() + x[:, :-self.pre_lookahead_len], new_cache


class Upsample1D(nn.Module):
    """Nearest-neighbour upsampling by ``stride``, then a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int, scale_factor: float):
        super().__init__()
        self.stride = stride
        self.scale_factor = float(scale_factor)
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return self.conv(F.pad(y, (self.stride * 2, 0)))

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.stride * 2)
        y = torch.cat([cache, y], dim=2)
        return self.conv(y), y[..., -self.stride * 2:]


@dataclass
class EncoderCache:
    """One stream's encoder state. ``att1`` ``[num_blocks, B, H, t, 2*d_k]`` and ``att2``
    ``[num_up_blocks, B, H, stride*t, 2*d_k]`` hold every past frame (the reference never
    trims them); ``cnn1`` ``[B, C, 2]`` (lookahead conv) and ``cnn2`` ``[B, C, 2*stride]``."""

    att1: torch.Tensor
    att2: torch.Tensor
    cnn1: torch.Tensor
    cnn2: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.att1.shape[3]


class UpsampleEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.embed = LinearInput(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            EncoderBlock(d, cfg.attention_heads, cfg.linear_units, cfg.key_bias) for _ in range(cfg.num_blocks))
        self.up_layer = Upsample1D(d, cfg.up_stride, cfg.up_scale_factor)
        self.up_embed = LinearInput(cfg.input_size, d)
        self.up_encoders = nn.ModuleList(
            EncoderBlock(d, cfg.attention_heads, cfg.linear_units, cfg.key_bias) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.pos = RelPositionTable(d)

    @property
    def up_rate(self) -> int:
        return self.cfg.up_stride

    def forward(self, xs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, T, D]`` -> ``[B, 2T, D]``. ``mask`` ``[B, T, T]`` bool
        (True = attend) restricts the first stage; the up stage uses it repeated x2 in both
        axes. None = full attention (the reference's offline ``inference``)."""
        xs = self.embed(xs)
        xs = self.pre_lookahead_layer(xs)
        pos = self.pos.get(xs.shape[1], xs.device, xs.dtype)
        for layer in self.encoders:
            xs, _ = layer(xs, pos, None, mask)
        # .contiguous() where the reference has it: GEMMs on transposed views round differently
        xs = self.up_layer(xs.transpose(1, 2).contiguous()).transpose(1, 2).contiguous()
        xs = self.up_embed(xs)
        pos = self.pos.get(xs.shape[1], xs.device, xs.dtype)
        mask2 = None
        if mask is not None:
            r = self.up_rate
            mask2 = mask.repeat_interleave(r, dim=1).repeat_interleave(r, dim=2)
        for layer in self.up_encoders:
            xs, _ = layer(xs, pos, None, mask2)
        return self.after_norm(xs)

    def forward_chunk(self, xs: torch.Tensor, last: bool, cache: EncoderCache | None
                      ) -> tuple[torch.Tensor, EncoderCache]:
        """One chunk of token embeddings ``[B, t, D]`` (lookahead included) ->
        ``[B, 2*(t-lookahead), D]`` (``[B, 2t, D]`` when ``last``) and the new cache."""
        offset = cache.tokens if cache is not None else 0
        xs = self.embed(xs)
        if last:
            xs = F.pad(xs, (0, 0, 0, self.cfg.pre_lookahead_len))
        xs, cnn1 = self.pre_lookahead_layer.forward_chunk(xs, cache.cnn1 if cache is not None else None)
        pos = self.pos.get(offset + xs.shape[1], xs.device, xs.dtype)
        att1 = []
        for i, layer in enumerate(self.encoders):
            xs, c = layer(xs, pos, cache.att1[i] if cache is not None else None)
            att1.append(c)
        up, cnn2 = self.up_layer.forward_chunk(xs.transpose(1, 2).contiguous(),
                                               cache.cnn2 if cache is not None else None)
        xs = self.up_embed(up.transpose(1, 2).contiguous())
        pos = self.pos.get(offset * self.up_rate + xs.shape[1], xs.device, xs.dtype)
        att2 = []
        for i, layer in enumerate(self.up_encoders):
            xs, c = layer(xs, pos, cache.att2[i] if cache is not None else None)
            att2.append(c)
        return self.after_norm(xs), EncoderCache(torch.stack(att1), torch.stack(att2), cnn1, cnn2)
