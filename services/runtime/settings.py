"""Settings shared by every process that loads the model (practice 7: declared once,
typed, with a default; env prefix ``STEPAUDIO2_``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPAUDIO2_", extra="ignore")

    # A Step-Audio 2 checkpoint folder (real layout). Unset: a tiny random one is made.
    model_dir: Path | None = None
    # Weights dtype: "auto" keeps the checkpoint's torch_dtype (bf16 for the real mini).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "cpu" or a torch device string such as "cuda:0".
    device: str = "cpu"
    # Where generated artefacts (tiny checkpoints, demo output) go.
    cache_dir: Path = Path(".cache")
