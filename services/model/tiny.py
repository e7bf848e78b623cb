"""Deterministic random checkpoints in the exact on-disk format of Step-Audio-2-mini.

Same file set (config.json with the real keys, sharded safetensors + index, the
tokenizer files), same tensor names, tiny dims by default. Used by tests, the demo
and benchmarks (no weights can be downloaded in CI).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from stepaudio2.model.checkpoint import parse_dtype, save_checkpoint
from stepaudio2.model.config import StepAudio2Config, make_config_dict


@dataclass(frozen=True)
class TinyDims:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    audio_state: int = 64
    audio_heads: int = 4
    audio_layers: int = 2


PRESETS = {
    "tiny": TinyDims(),
    # The "mid-size" checkpoint of the decode benchmark: 8 layers x 512.
    "mid": TinyDims(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2,
                    audio_state=256, audio_heads=4, audio_layers=2),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table (the trained encoder's table resembles it)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1).float()


def random_state(cfg: StepAudio2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 random weights for every tensor of ``cfg``, deterministic under ``seed``."""
    from stepaudio2.model.modeling import expected_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(expected_shapes(cfg).items()):
        if name == "encoder.positional_embedding.weight":
            t = sinusoids(shape[0], shape[1])
        elif name.endswith("norm.weight") or name.endswith("_ln.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.02 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * (shape[2] if len(shape) > 2 else 1) if len(shape) > 1 else shape[0]
            std = 0.02 if name.endswith("embed_tokens.weight") else 1.0 / math.sqrt(fan_in)
            t = std * torch.randn(shape, generator=g)
        state[name] = t
    return state


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, dims: TinyDims | str = "tiny",
                         dtype: str = "float32", max_shard_bytes: int | None = None) -> Path:
    """Write a random checkpoint folder; returns its path."""
    from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = PRESETS[dims] if isinstance(dims, str) else dims
    n_tokens = write_tiny_tokenizer(out)
    vocab = ((n_tokens + 127) // 128) * 128  # embedding rows padded past the last id, as the real 158720
    from stepaudio2.model.tokenizer import StepAudioTokenizer

    eos = StepAudioTokenizer.from_dir(out).special.endoftext
    cfg_dict = make_config_dict(hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                                num_layers=d.num_layers, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                                vocab_size=vocab, audio_state=d.audio_state, audio_heads=d.audio_heads,
                                audio_layers=d.audio_layers, torch_dtype=dtype, eos_token_id=eos)
    cfg = StepAudio2Config.from_dict(cfg_dict)
    state = random_state(cfg, seed)
    want = parse_dtype(dtype)
    state = {k: v.to(want) for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    # Several shards even when tiny, so the index/shard path is always exercised.
    shard = max_shard_bytes or max(1, total // 3 + 1)
    save_checkpoint(state, cfg_dict, out, max_shard_bytes=shard)
    from stepaudio2.model.token2wav.tiny import make_tiny_token2wav
    make_tiny_token2wav(out / "token2wav", seed=seed)   # flow.yaml/pt, hift.pt, the two ONNX models
    return out
