"""Settings of the orchestrator (practice 7: every value declared once, typed, with a
default and a comment; env prefix ``STEPAUDIO2_ORCH_``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPAUDIO2_ORCH_", extra="ignore", populate_by_name=True)

    # Where the public gRPC API listens. Port 0 picks a free port (tests, `up --grpc-port 0`).
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # Triton's gRPC address (host:port) serving `audio_encoder`, `llm`, `token2wav`, `voice_encoder`.
    triton_url: str = "127.0.0.1:8001"
    # Keepalive ping interval towards Triton, seconds; 0 = off. Enable only together with
    # Triton's --grpc-http2-min-recv-ping-interval-without-data below it (else GOAWAY).
    triton_keepalive_s: float = Field(default=0.0, ge=0)
    # The checkpoint folder: its tokenizer builds prompts, its name is the served model id.
    # Falls back to the shared STEPAUDIO2_MODEL_DIR.
    model_dir: Path = Field(validation_alias=AliasChoices("model_dir", "STEPAUDIO2_ORCH_MODEL_DIR",
                                                          "STEPAUDIO2_MODEL_DIR"))
    # The served model id; default: the checkpoint folder's name (PUBLIC_API.md).
    model_id: str | None = None

    # Longest audio accepted by Transcribe, seconds (checked from the header, before decoding).
    max_audio_seconds: float = Field(default=7200.0, gt=0)
    # Largest request accepted, bytes: the gRPC receive limit (plus a small envelope) and
    # the audio byte limit (AudioTooLarge above it).
    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Tokens generated per <= 25 s segment when the request leaves it 0.
    max_tokens_per_segment: int = Field(default=512, gt=0)
    # The most a request may ask for per segment.
    max_tokens_per_segment_limit: int = Field(default=4096, gt=0)
    # Segments of one request decoded at the same time (memory: each holds its embeddings).
    segment_concurrency: int = Field(default=4, gt=0)
    # Longest `prompt` text a request may add to the ASR turn, characters.
    max_prompt_chars: int = Field(default=2000, ge=0)
    # Budget of one request's Triton calls when the caller sets no gRPC deadline, seconds.
    default_timeout_s: float = Field(default=3600.0, gt=0)

    # Text to speech (Synthesize): the prompt (spec §2.3): `chat` for the chat model
    # (Step-Audio-2-mini), `base` for the Base model.
    tts_prompt_style: Literal["chat", "base"] = "chat"
    # Longest text one Synthesize request may read, characters.
    max_tts_chars: int = Field(default=4096, gt=0)
    # Tokens generated per Synthesize request when the request leaves it 0, and the most
    # it may ask for (about 31 LLM tokens per second of speech, spec §2.2).
    tts_max_tokens: int = Field(default=2048, gt=0)
    tts_max_tokens_limit: int = Field(default=8192, gt=0)
    # The voice used when a request names none.
    default_voice: str = "default_female"
    # The voice library as the token2wav model sees it: a local folder here, or (unset)
    # the STEPAUDIO2_VOICES_* settings (S3 or a local folder).
    voices_dir: Path | None = None
    # Longest reference recording accepted by RegisterVoice, bytes.
    max_voice_bytes: int = Field(default=16 * 1024 * 1024, gt=0)

    # API keys (tenant:key pairs, comma-separated; `tenant:sha256:<hex>` for pre-hashed).
    api_keys: SecretStr | None = None
    # A file of `tenant:key` / `tenant:sha256:<hex>` lines (# comments allowed).
    api_keys_file: Path | None = None
    # A mounted Kubernetes Secret: one file per tenant (file name = tenant id), the
    # file's lines are that tenant's keys (raw, or `sha256:<hex>`).
    api_keys_dir: Path | None = None
    # Serve without any API key (local development only). Without keys and without this,
    # the server refuses to start.
    allow_unauthenticated: bool = False

    # Shutdown: seconds in-flight RPCs get to finish after health turns NOT_SERVING.
    grace_period_s: float = Field(default=10.0, ge=0)
    # How often readiness re-checks Triton, seconds.
    readiness_poll_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OrchestratorSettings":
        if self.max_tokens_per_segment > self.max_tokens_per_segment_limit:
            raise ValueError("max_tokens_per_segment must not exceed max_tokens_per_segment_limit")
        if self.tts_max_tokens > self.tts_max_tokens_limit:
            raise ValueError("tts_max_tokens must not exceed tts_max_tokens_limit")
        return self

    @property
    def served_model_id(self) -> str:
        return self.model_id or Path(self.model_dir).resolve().name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
