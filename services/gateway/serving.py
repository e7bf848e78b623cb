"""The gateway's logic: OpenAI-shaped requests in, ``stepaudio2.v1`` calls to the
orchestrator, OpenAI-shaped responses out (practice 10: routes only translate HTTP).

The gateway holds no model logic and decodes no audio: the orchestrator sniffs, decodes
and validates the bytes, and its errors (google.rpc.Status with an ErrorInfo whose
``reason`` is our error code) come back here and are reported with the HTTP status of
``stepaudio2.runtime.errors.ERROR_TABLE``.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Union

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepaudio2.gateway.protocol import (
    SpeechRequest,
    VoiceDeleted,
    VoiceList,
    VoiceObject,
    ModelCard,
    ModelList,
    TranscriptionRequest,
    TranscriptionResponse,
    TranscriptionResponseVerbose,
    TranscriptionSegment,
    TranscriptionUsage,
)
from stepaudio2.gateway.settings import GatewaySettings
from stepaudio2.runtime.errors import ERROR_TABLE, InvalidArgument, InvalidAudio, NotFound, StepAudio2Error
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

_LOGGER = logging.getLogger(__name__)

# Extra room in a gRPC message beyond the audio bytes (the other request fields).
_MESSAGE_OVERHEAD_BYTES = 1024 * 1024
# Deadline of the cheap metadata calls (ListModels).
_METADATA_TIMEOUT_S = 10.0
# Transcripts are small; this only bounds a misbehaving upstream.
_MAX_RECEIVE_BYTES = 16 * 1024 * 1024
# The error detail our services attach (common.proto: domain "stepaudio2").
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Our codes whose name is also a gRPC status name: the fallback when an upstream error
# carries no ErrorInfo (e.g. the channel itself failed).
_CODE_BY_GRPC_NAME = {m.grpc: code for code, m in ERROR_TABLE.items() if code == m.grpc}

TranscriptionResult = Union[TranscriptionResponse, TranscriptionResponseVerbose, str]


class ApiError(StepAudio2Error):
    """An error with any code of ``ERROR_TABLE``, e.g. one relayed from the orchestrator."""

    def __init__(self, code: str, reason: str, *, field: str | None = None):
        super().__init__(reason, field=field)
        self.code = code if code in ERROR_TABLE else "INTERNAL"


@dataclass(frozen=True)
class CallContext:
    """What a request passes on to the orchestrator, as gRPC metadata."""

    request_id: str
    api_key: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [("x-request-id", self.request_id)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)


def channel_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """gRPC channel options, each with its reason."""
    return [
        # A whole upload travels in one Transcribe message.
        ("grpc.max_send_message_length", settings.max_upload_bytes + _MESSAGE_OVERHEAD_BYTES),
        ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
        # Reconnect quickly once the orchestrator (re)starts, so /readyz turns 200 within
        # seconds rather than after gRPC's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def error_from_rpc(exc: grpc.aio.AioRpcError, address: str) -> ApiError:
    """Translate a failed orchestrator call into our taxonomy.

    The orchestrator's ErrorInfo.reason is our error code and its BadRequest names the
    field. Without them the failure is the channel's own: UNAVAILABLE then means the
    orchestrator cannot be reached, DEADLINE_EXCEEDED that our deadline ran out.
    """
    message, reason, field = exc.details() or "", None, None
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                field = field or info.metadata.get("field")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    if reason in ERROR_TABLE:
        if field and message.startswith(f"{field}: "):
            message = message[len(field) + 2:]  # StepAudio2Error's "field: reason" form
        return ApiError(reason, message, field=_http_param(field))
    status_name = exc.code().name
    if status_name == "UNAVAILABLE":
        return ApiError("UNAVAILABLE", f"the orchestrator at {address} is unreachable ({message or 'no detail'})")
    if status_name == "DEADLINE_EXCEEDED":
        return ApiError("DEADLINE_EXCEEDED", f"the orchestrator at {address} did not answer in time")
    return ApiError(_CODE_BY_GRPC_NAME.get(status_name, "INTERNAL"), message or status_name, field=field)


def _http_param(field: str | None) -> str | None:
    """The HTTP form field for a ``TranscribeRequest`` field: the audio is ``file``."""
    if not field:
        return None
    return "file" if field.split(".")[0] == "audio" else field


# ---- response formats ------------------------------------------------------------------

def format_timestamp(seconds: float, *, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm`` (SRT uses ``,``, WebVTT ``.``); hours may exceed 99."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue and "-->" starts a timing line in both formats: neither may
    # appear inside cue text.
    lines = [ln.strip() for ln in text.strip().splitlines()]
    return "\n".join(ln for ln in lines if ln).replace("-->", "->")


def _cues(segments) -> list[tuple[float, float, str]]:
    cues = []
    for seg in segments:
        text = _cue_text(seg.text)
        if text:  # a cue without text is not valid SRT; silent segments are left out
            cues.append((seg.start_s, max(seg.end_s, seg.start_s), text))
    return cues


def to_srt(segments) -> str:
    """SubRip: numbered cues ``1..n``, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank-line separated."""
    blocks = [
        f"{i}\n{format_timestamp(start, decimal_marker=',')} --> {format_timestamp(end, decimal_marker=',')}\n{text}\n"
        for i, (start, end, text) in enumerate(_cues(segments), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    blocks = [
        f"{format_timestamp(start, decimal_marker='.')} --> {format_timestamp(end, decimal_marker='.')}\n{text}\n"
        for start, end, text in _cues(segments)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render_transcription(req: TranscriptionRequest, resp: assistant_pb2.TranscribeResponse) -> TranscriptionResult:
    """A ``TranscribeResponse`` in the requested ``response_format``."""
    usage = TranscriptionUsage(seconds=round(resp.duration_s, 3))
    if req.response_format == "json":
        return TranscriptionResponse(text=resp.text, usage=usage)
    if req.response_format == "text":
        return resp.text
    if req.response_format == "srt":
        return to_srt(resp.segments)
    if req.response_format == "vtt":
        return to_vtt(resp.segments)
    segments = [
        TranscriptionSegment(id=s.index, seek=round(s.start_s * 100), start=s.start_s, end=s.end_s, text=s.text,
                             temperature=req.temperature)
        for s in resp.segments
    ]
    return TranscriptionResponseVerbose(language=req.language or "und", duration=resp.duration_s, text=resp.text,
                                        segments=segments, usage=usage)


# ---- the serving object ------------------------------------------------------------------

class GatewayServing:
    """One per app: holds the orchestrator channel and implements every route's logic."""

    def __init__(self, settings: GatewaySettings, channel: grpc.aio.Channel | None = None):
        self.settings = settings
        self.address = settings.orchestrator_address
        self._channel = channel or grpc.aio.insecure_channel(self.address, options=channel_options(settings))
        self._assistant = assistant_pb2_grpc.AssistantStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _call(self, method, request, ctx: CallContext, timeout: float):
        try:
            return await method(request, metadata=ctx.metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc, self.address)
            _LOGGER.info("orchestrator call failed: request_id=%s code=%s %s", ctx.request_id, err.code, err)
            raise err from None

    async def create_transcription(self, req: TranscriptionRequest, audio: bytes,
                                   ctx: CallContext) -> TranscriptionResult:
        """Transcribe one uploaded file. Empty uploads are refused here (400) without a
        round trip; every other check on the bytes is the orchestrator's."""
        if not audio:
            raise InvalidAudio("the uploaded audio file is empty (0 bytes)", field="file")
        message = assistant_pb2.TranscribeRequest(
            # Encoding left UNSPECIFIED: the orchestrator sniffs the container.
            audio=common_pb2.AudioChunk(data=audio),
            model=req.model,
            language=req.language,
            prompt=req.prompt,
            temperature=req.temperature,
        )
        resp = await self._call(self._assistant.Transcribe, message, ctx, self.settings.request_timeout_s)
        return render_transcription(req, resp)

    async def list_models(self, ctx: CallContext) -> ModelList:
        resp = await self._call(self._assistant.ListModels, assistant_pb2.ListModelsRequest(), ctx,
                                _METADATA_TIMEOUT_S)
        return ModelList(data=[ModelCard(id=m.id, created=m.created, owned_by=m.owned_by or "stepaudio2")
                               for m in resp.models])

    async def retrieve_model(self, model_id: str, ctx: CallContext) -> ModelCard:
        for card in (await self.list_models(ctx)).data:
            if card.id == model_id:
                return card
        raise NotFound(f"the model {model_id!r} is not served here", field="model")

    # -- text to speech and voices ---------------------------------------------------------

    async def _speech_stream(self, req: SpeechRequest, ctx: CallContext) -> AsyncIterator[bytes]:
        """The body: raw audio bytes, or (``stream_format`` sse) OpenAI's server-sent events
        ``speech.audio.delta`` (base64 audio) and a final ``speech.audio.done`` with usage."""
        call = self._assistant.Synthesize(speech_message(req), metadata=ctx.metadata(),
                                          timeout=self.settings.request_timeout_s)
        sse = req.stream_format == "sse"
        try:
            async for event in call:
                if event.audio.data:
                    yield sse_event({"type": "speech.audio.delta",
                                     "audio": base64.b64encode(event.audio.data).decode()}) if sse \
                        else event.audio.data
                if sse and event.HasField("usage"):
                    u = event.usage
                    yield sse_event({"type": "speech.audio.done", "usage": {
                        "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                        "total_tokens": u.prompt_tokens + u.completion_tokens}})
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc, self.address)
            _LOGGER.info("orchestrator call failed: request_id=%s code=%s %s", ctx.request_id, err.code, err)
            raise err from None
        finally:
            call.cancel()        # no-op once finished; stops the synthesis when the client left

    async def create_speech(self, req: SpeechRequest, ctx: CallContext) -> tuple[bytes, AsyncIterator[bytes]]:
        """(first bytes, the rest): the first audio is awaited before the HTTP response starts,
        so request errors (unknown voice 404, bad text 400...) still get their status code."""
        stream = self._speech_stream(req, ctx)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = b""
        return first, stream

    async def create_voice(self, voice_id: str, name: str, description: str, audio: bytes,
                           ctx: CallContext) -> VoiceObject:
        if not audio:
            raise InvalidAudio("the uploaded reference recording is empty (0 bytes)", field="file")
        resp = await self._call(self._assistant.RegisterVoice, assistant_pb2.RegisterVoiceRequest(
            voice_id=voice_id, name=name, description=description, audio=common_pb2.AudioChunk(data=audio)),
            ctx, self.settings.request_timeout_s)
        return voice_object(resp)

    async def list_voices(self, ctx: CallContext) -> VoiceList:
        resp = await self._call(self._assistant.ListVoices, assistant_pb2.ListVoicesRequest(), ctx, _METADATA_TIMEOUT_S)
        return VoiceList(data=[voice_object(v) for v in resp.voices])

    async def get_voice(self, voice_id: str, ctx: CallContext) -> VoiceObject:
        return voice_object(await self._call(self._assistant.GetVoice, assistant_pb2.GetVoiceRequest(voice_id=voice_id),
                                             ctx, _METADATA_TIMEOUT_S))

    async def delete_voice(self, voice_id: str, ctx: CallContext) -> VoiceDeleted:
        await self._call(self._assistant.DeleteVoice, assistant_pb2.DeleteVoiceRequest(voice_id=voice_id), ctx,
                         _METADATA_TIMEOUT_S)
        return VoiceDeleted(id=voice_id)

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready when the orchestrator's gRPC health is SERVING, which it
        reports only once Triton and its models are ready."""
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=self.settings.readiness_timeout_s)
        except grpc.aio.AioRpcError as exc:
            return False, f"orchestrator at {self.address}: {exc.code().name} ({exc.details() or 'no detail'})"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return resp.status == health_pb2.HealthCheckResponse.SERVING, f"orchestrator at {self.address}: {status}"


# ---- text to speech and voices -------------------------------------------------------------

SPEECH_ENCODINGS = {"wav": common_pb2.AUDIO_ENCODING_WAV, "pcm": common_pb2.AUDIO_ENCODING_PCM16,
                    "flac": common_pb2.AUDIO_ENCODING_FLAC, "mp3": common_pb2.AUDIO_ENCODING_MP3}
SPEECH_MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}


def speech_message(req: SpeechRequest) -> assistant_pb2.SynthesizeRequest:
    """``POST /v1/audio/speech`` -> ``SynthesizeRequest``."""
    sampling = common_pb2.SamplingOptions()
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            setattr(sampling, name, value)
    sampling.max_tokens = req.max_tokens or 0
    sampling.min_tokens = req.min_tokens or 0
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidArgument(f"logit_bias keys are token ids, got {key!r}", field="logit_bias") from None
        sampling.logit_bias[token] = bias
    sampling.allowed_token_ids.extend(req.allowed_token_ids or [])
    return assistant_pb2.SynthesizeRequest(text=req.input, voice=req.voice, model=req.model,
                                           encoding=SPEECH_ENCODINGS[req.response_format], speed=req.speed,
                                           sampling=sampling)


def sse_event(payload: dict) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def voice_object(v: assistant_pb2.VoiceInfo) -> VoiceObject:
    return VoiceObject(id=v.voice_id, name=v.name, description=v.description, created_at=v.created,
                       prompt_tokens=v.prompt_tokens, builtin=v.builtin, owner=v.owner)
