"""Settings of the HTTP gateway (practice 7: every value declared once, typed, with a
default; env prefix ``STEPAUDIO2_GATEWAY_``)."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPAUDIO2_GATEWAY_", extra="ignore")

    # Where uvicorn listens. Port 0 picks a free port (tests, `stepaudio2 up --http-port 0`).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # The orchestrator's gRPC address (host:port); the gateway holds no model logic.
    orchestrator_address: str = "127.0.0.1:50051"
    # Largest audio file accepted, in bytes (OpenAI's and vLLM's limit: 25 MiB). Checked
    # against Content-Length before reading, and counted while the body streams in.
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    # Deadline of one orchestrator call (a transcription of up to max_upload_bytes of audio).
    request_timeout_s: float = Field(default=300.0, gt=0)
    # Deadline of the orchestrator health check behind /readyz.
    readiness_timeout_s: float = Field(default=2.0, gt=0)
    # API keys are passed through: the caller's `Authorization: Bearer KEY` is forwarded to
    # the orchestrator, which validates it. With this on, requests to /v1/* that carry no
    # key at all are refused here already (401) without calling the orchestrator.
    require_api_key: bool = True
