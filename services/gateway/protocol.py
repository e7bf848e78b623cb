"""Pydantic models of the OpenAI-shaped HTTP API (practice 10: protocol beside serving).

Only shapes live here: what a request may carry and what a response looks like. The
translation to and from ``stepaudio2.v1`` messages is in ``serving.py``.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stepaudio2.runtime.errors import InvalidArgument

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class TranscriptionRequest(BaseModel):
    """The text fields of ``POST /v1/audio/transcriptions`` (the file travels beside them).

    Unknown fields that OpenAI clients may send (``timestamp_granularities[]``,
    ``include[]``, ``chunking_strategy``) are ignored, as other compatible servers do.
    """

    model_config = ConfigDict(extra="ignore")

    # The served model id (GET /v1/models); empty means the served model.
    model: str = Field(default="", max_length=256)
    # ISO-639-1 hint. Step-Audio 2 does not need it; it is echoed in verbose_json.
    language: str = Field(default="", max_length=32)
    # Context text appended to the system prompt.
    prompt: str = ""
    response_format: ResponseFormat = "json"
    # OpenAI's range; 0 = greedy.
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    # Server-sent events are not offered on this route yet (gRPC TranscribeStream is).
    stream: bool = False

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming transcription is not supported over HTTP; use gRPC TranscribeStream")
        return v

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> "TranscriptionRequest":
        """Validate multipart text fields; the first problem becomes ``InvalidArgument``
        naming the field (HTTP 400 with ``param``)."""
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v != ""})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise InvalidArgument(err["msg"].removeprefix("Value error, "), field=field) from None


class TranscriptionUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionResponse(BaseModel):
    """``response_format=json``."""

    text: str
    usage: Optional[TranscriptionUsage] = None


class TranscriptionSegment(BaseModel):
    """One segment of ``verbose_json``, in OpenAI's field set.

    Step-Audio 2 reports no per-segment log-probabilities or token ids over this API:
    ``tokens`` is empty (the count is in ``usage`` of the gRPC response) and the
    Whisper-specific quality fields are 0.
    """

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


class TranscriptionResponseVerbose(BaseModel):
    """``response_format=verbose_json``."""

    task: Literal["transcribe"] = "transcribe"
    # The request's language hint, or "und" (BCP-47 "undetermined") when none was given:
    # the model does not report a detected language.
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: Optional[TranscriptionUsage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: str


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"message", "type", "param", "code"}}``.
    ``code`` is our error code (``stepaudio2.runtime.errors.ERROR_TABLE``)."""

    error: ErrorInfo


# ---- text to speech and voices ----------------------------------------------------------
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
SUPPORTED_SPEECH_FORMATS = ("wav", "pcm", "flac", "mp3")


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech`` (OpenAI's shape), plus sampling extensions as other
    OpenAI-compatible servers offer them (vLLM: ``seed``, ``min_tokens``,
    ``allowed_token_ids``...). Unknown fields (``instructions``) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(default="", max_length=256)
    input: str = Field(min_length=1)
    voice: str = Field(default="", max_length=64)
    # OpenAI's default is mp3 (encoded whole, sent at the end); wav and pcm stream.
    response_format: SpeechFormat = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    # "audio": the body is the audio itself; "sse": OpenAI's speech.audio.delta / .done events.
    stream_format: Literal["audio", "sse"] = "audio"
    # Extensions (unset = the server's TTS defaults, spec §2.4).
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    seed: Optional[int] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    min_tokens: Optional[int] = Field(default=None, ge=0)
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None

    @field_validator("response_format")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v not in SUPPORTED_SPEECH_FORMATS:
            raise ValueError(f"response_format {v!r} is not supported here; use one of "
                             f"{', '.join(SUPPORTED_SPEECH_FORMATS)}")
        return v


class VoiceObject(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    description: str = ""
    created_at: str
    prompt_tokens: int
    builtin: bool = False
    owner: str = ""


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceObject]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True
