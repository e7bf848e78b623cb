"""Audio encoder (spec §1.3) and adapter (spec §1.4).

Module and parameter names mirror the checkpoint's tensor names (spec §5.3):
``encoder.conv1``, ``encoder.blocks.{i}.attn.query`` ... ``adapter.linear2``.
Numerics follow the reference: LayerNorm in fp32, q and k each scaled by
(d/h)^-0.25, softmax in fp32, an additive -1e10 padding bias sub-sampled from the
padded mel length (so batching changes results exactly as in the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.audio import encoder_output_length
from stepaudio2.model.config import ADAPTER_HIDDEN, AudioEncoderConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (Whisper convention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # spec §1.3: key has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_head
        scale = (d // h) ** -0.25
        q = self.query(x).view(b, t, h, -1).permute(0, 2, 1, 3) * scale
        k = self.key(x).view(b, t, h, -1).permute(0, 2, 3, 1) * scale
        v = self.value(x).view(b, t, h, -1).permute(0, 2, 1, 3)
        qk = (q @ k + bias).float()
        w = F.softmax(qk, dim=-1).to(q.dtype)
        return self.out((w @ v).permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), bias)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """128-mel at 100 fps -> 25 fps features of width n_audio_state (spec §1.3)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        s = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, s, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(s, s, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(cfg.n_audio_ctx, s)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(s, cfg.n_audio_head) for _ in range(cfg.n_audio_layer))
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = LayerNorm(s)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, n_mels, T]; lengths [B] = encoder input lengths (F - 2, spec §1.2)."""
        t = mel.shape[-1]
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)  # [B, ceil(T/2), S]
        if x.shape[1] > self.positional_embedding.num_embeddings:
            raise ValueError(f"audio too long for the encoder: {x.shape[1]} positions > "
                             f"{self.positional_embedding.num_embeddings} (30 s max, spec §1.3)")
        # Padding mask on the mel grid, sub-sampled as the reference does: [(T+1)%2::2].
        valid = torch.arange(t, device=mel.device)[None, :] < lengths.to(mel.device)[:, None]
        valid = valid[:, (t + 1) % 2::2]
        bias = ((1.0 - valid.to(x.dtype)) * -1.0e10)[:, None, None, :]  # [B, 1, 1, T/2]
        x = (x + self.positional_embedding.weight[: x.shape[1]]).to(x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = self.after_norm(x.contiguous())
        out_lens = torch.tensor([encoder_output_length(int(n)) for n in lengths], dtype=torch.long)
        return x, out_lens


class Adaptor(nn.Module):
    """Stride-2 conv + GELU, Linear -> 2048 -> ReLU -> Linear to llm_dim (spec §1.4)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        s = cfg.n_audio_state
        self.conv = nn.Conv1d(s, s, cfg.kernel_size, cfg.adapter_stride, padding=1)
        self.linear1 = nn.Linear(s, ADAPTER_HIDDEN)
        self.linear2 = nn.Linear(ADAPTER_HIDDEN, cfg.llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv(x.permute(0, 2, 1))).permute(0, 2, 1)
        return self.linear2(F.relu(self.linear1(x)))
