"""Typed view of a Step-Audio 2 `config.json` (spec §5.2).

Only the keys the architecture needs are read; everything else in the file is kept in
``raw`` and written back unchanged. The defaults inside StepFun's
``configuration_step_audio_2.py`` are NOT the mini values (spec §5.2, "Watch out"), so
every dimension here is required in the file: a missing key is an error naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepaudio2.runtime.errors import CheckpointError

ADAPTER_HIDDEN = 2048  # hard-coded in the reference, whatever the other widths (spec §1.4)


def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"config.json: {where}.{key} is missing")
    return d[key]


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (spec §1.7)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 16384
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        w = "text_config"
        kv = d.get("num_key_value_heads", d.get("num_attention_groups"))
        if kv is None:
            raise CheckpointError("config.json: text_config.num_key_value_heads is missing")
        if d.get("rope_scaling") not in (None, {}):
            raise CheckpointError("config.json: text_config.rope_scaling is set; Step-Audio 2 uses none (spec §1.7)")
        cfg = cls(
            hidden_size=int(_req(d, "hidden_size", w)),
            intermediate_size=int(_req(d, "intermediate_size", w)),
            num_attention_heads=int(_req(d, "num_attention_heads", w)),
            num_key_value_heads=int(kv),
            num_hidden_layers=int(_req(d, "num_hidden_layers", w)),
            vocab_size=int(_req(d, "vocab_size", w)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", d.get("max_seq_len", 16384))),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"config.json: text_config heads do not divide: hidden {cfg.hidden_size}, "
                f"heads {cfg.num_attention_heads}, kv heads {cfg.num_key_value_heads}")
        return cfg


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whisper-style encoder + adapter (spec §1.3, §1.4)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    llm_dim: int
    kernel_size: int = 3
    adapter_stride: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "AudioEncoderConfig":
        w = "audio_encoder_config"
        cfg = cls(
            n_mels=int(_req(d, "n_mels", w)),
            n_audio_ctx=int(_req(d, "n_audio_ctx", w)),
            n_audio_state=int(_req(d, "n_audio_state", w)),
            n_audio_head=int(_req(d, "n_audio_head", w)),
            n_audio_layer=int(_req(d, "n_audio_layer", w)),
            llm_dim=int(_req(d, "llm_dim", w)),
            kernel_size=int(d.get("kernel_size", 3)),
            adapter_stride=int(d.get("adapter_stride", 2)),
        )
        if cfg.n_audio_state % cfg.n_audio_head:
            raise CheckpointError("config.json: audio_encoder_config.n_audio_state is not divisible by n_audio_head")
        return cfg


@dataclass(frozen=True)
class StepAudio2Config:
    text: TextConfig
    audio: AudioEncoderConfig
    torch_dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "StepAudio2Config":
        if d.get("model_type") not in ("step_audio_2", None):
            raise CheckpointError(f"config.json: model_type is {d.get('model_type')!r}, expected 'step_audio_2'")
        text = _req(d, "text_config", "config")
        audio = _req(d, "audio_encoder_config", "config")
        dtype = d.get("torch_dtype") or text.get("torch_dtype") or "bfloat16"
        cfg = cls(TextConfig.from_dict(text), AudioEncoderConfig.from_dict(audio), str(dtype), raw=d)
        if cfg.audio.llm_dim != cfg.text.hidden_size:
            raise CheckpointError(
                f"config.json: audio_encoder_config.llm_dim {cfg.audio.llm_dim} != text_config.hidden_size {cfg.text.hidden_size}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "StepAudio2Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise CheckpointError(f"{path.name} not found in {path.parent}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"config.json is not valid JSON: {e}") from None
        return cls.from_dict(d)


def make_config_dict(*, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, vocab_size: int, audio_state: int, audio_heads: int,
                     audio_layers: int, torch_dtype: str = "float32", eos_token_id: int = 151643,
                     max_seq_len: int = 16384, n_audio_ctx: int = 1500) -> dict:
    """A `config.json` dict with exactly the real mini's keys (spec §5.2), other dims."""
    return {
        "architectures": ["StepAudio2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_step_audio_2.StepAudio2Config",
            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM",
        },
        "model_type": "step_audio_2",
        "torch_dtype": torch_dtype,
        "text_config": {
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_attention_heads": num_heads,
            "num_attention_groups": num_kv_heads,
            "num_key_value_heads": num_kv_heads,
            "num_hidden_layers": num_layers,
            "max_seq_len": max_seq_len,
            "max_position_embeddings": max_seq_len,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id,
            "torch_dtype": torch_dtype,
        },
        "audio_encoder_config": {
            "n_mels": 128,
            "n_audio_ctx": n_audio_ctx,
            "n_audio_state": audio_state,
            "n_audio_head": audio_heads,
            "n_audio_layer": audio_layers,
            "n_codebook_size": 4096,
            "llm_dim": hidden_size,
            "kernel_size": 3,
            "adapter_stride": 2,
        },
    }


def mini_config_dict() -> dict:
    """The real Step-Audio-2-mini dims (spec §5.2), for meta-device shape checks."""
    return make_config_dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                            num_kv_heads=4, vocab_size=158720, audio_state=1280, audio_heads=20,
                            audio_layers=32, torch_dtype="bfloat16")
