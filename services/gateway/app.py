"""The HTTP gateway: OpenAI-compatible routes over the orchestrator's gRPC API.

Routes only translate HTTP (practice 10): they read the request, call ``GatewayServing``
and turn its result or error into a response. Middleware and error handlers are in
``server_utils.py``, shapes in ``protocol.py``, logic in ``serving.py``.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stepaudio2 import __version__
from stepaudio2.gateway.protocol import (ErrorResponse, ModelCard, ModelList, SpeechRequest, TranscriptionRequest,
                                         VoiceDeleted, VoiceList, VoiceObject)
from stepaudio2.gateway.serving import SPEECH_MEDIA_TYPES, CallContext, GatewayServing
from stepaudio2.gateway.server_utils import (
    GatewayMetrics,
    RequestContextMiddleware,
    api_key_guard,
    error_response,
    install_error_handlers,
    read_upload,
    run_until_disconnect,
)
from stepaudio2.gateway.settings import GatewaySettings

_LOGGER = logging.getLogger(__name__)

# Everything under /v1 needs an API key; the probes and /metrics need none (the only
# unauthenticated routes, reliability anchors §8.1).
api = APIRouter(prefix="/v1", dependencies=[Depends(api_key_guard)])
probes = APIRouter()

_TEXT_MEDIA_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 429, 503, 504)}
# The multipart body is read by hand (size limit while streaming), so describe it for
# the OpenAPI document ourselves.
_TRANSCRIPTION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "WAV, FLAC or OGG audio"},
                "model": {"type": "string", "description": "the served model id (GET /v1/models)"},
                "language": {"type": "string"},
                "prompt": {"type": "string"},
                "response_format": {"type": "string", "enum": ["json", "text", "srt", "vtt", "verbose_json"]},
                "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            },
        }}},
    }
}


def _serving(request: Request) -> GatewayServing:
    return request.app.state.serving


def _context(request: Request) -> CallContext:
    return CallContext(request_id=request.state.request_id, api_key=getattr(request.state, "api_key", None))


@api.post("/audio/transcriptions", responses=_ERRORS, openapi_extra=_TRANSCRIPTION_BODY)
async def create_transcription(request: Request) -> Response:
    state = request.app.state
    upload = await read_upload(request, state.settings.max_upload_bytes, state.metrics)
    req = TranscriptionRequest.from_form(upload.fields)
    result = await run_until_disconnect(request, _serving(request).create_transcription(req, upload.file,
                                                                                       _context(request)))
    if isinstance(result, str):
        return PlainTextResponse(result, media_type=_TEXT_MEDIA_TYPES[req.response_format])
    return JSONResponse(result.model_dump())


@api.post("/audio/speech", responses={**_ERRORS, 200: {"content": {t: {} for t in SPEECH_MEDIA_TYPES.values()}}})
async def create_speech(body: SpeechRequest, request: Request) -> Response:
    """Text to speech. wav and pcm (24 kHz, 16-bit mono) stream as token2wav makes each
    chunk; flac and mp3 come whole at the end. Errors found before the first audio get
    their HTTP status; a failure after that ends the body early (and is logged)."""
    ctx = _context(request)
    metrics = request.app.state.metrics
    t0 = time.perf_counter()
    first, rest = await run_until_disconnect(request, _serving(request).create_speech(body, ctx))
    if first:
        metrics.speech_first_audio.observe(time.perf_counter() - t0)

    async def body_iter():
        outcome = "client_left"       # GeneratorExit / cancellation when the client goes away
        try:
            if first:
                metrics.speech_audio_bytes.inc(len(first))
                yield first
            async for data in rest:
                metrics.speech_audio_bytes.inc(len(data))
                yield data
            outcome = "complete"
        except Exception as exc:  # noqa: BLE001 - the status line is gone: end the body early
            outcome = "failed"
            _LOGGER.warning("speech stream %s ended early: %s", ctx.request_id, exc)
        finally:
            metrics.speech_streams.labels(outcome).inc()
            await rest.aclose()

    headers = {"x-request-id": ctx.request_id}
    media = "text/event-stream" if body.stream_format == "sse" else SPEECH_MEDIA_TYPES[body.response_format]
    return StreamingResponse(body_iter(), media_type=media, headers=headers)


@api.post("/audio/voices", status_code=201, response_model=VoiceObject, responses=_ERRORS)
async def create_voice(request: Request) -> VoiceObject:
    """Register a voice: multipart with the reference recording in ``file`` (>= 1 s of
    speech; the first 30 s are used) and optional ``voice_id``, ``name``, ``description``."""
    state = request.app.state
    upload = await read_upload(request, state.settings.max_upload_bytes, state.metrics)
    f = upload.fields
    return await run_until_disconnect(request, _serving(request).create_voice(
        f.get("voice_id", ""), f.get("name", ""), f.get("description", ""), upload.file or b"", _context(request)))


@api.get("/audio/voices", response_model=VoiceList, responses=_ERRORS)
async def list_voices(request: Request) -> VoiceList:
    return await _serving(request).list_voices(_context(request))


@api.get("/audio/voices/{voice_id}", response_model=VoiceObject, responses=_ERRORS)
async def get_voice(voice_id: str, request: Request) -> VoiceObject:
    return await _serving(request).get_voice(voice_id, _context(request))


@api.delete("/audio/voices/{voice_id}", response_model=VoiceDeleted, responses=_ERRORS)
async def delete_voice(voice_id: str, request: Request) -> VoiceDeleted:
    return await _serving(request).delete_voice(voice_id, _context(request))


@api.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    return await _serving(request).list_models(_context(request))


@api.get("/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return await _serving(request).retrieve_model(model_id, _context(request))


@probes.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers. Checks no dependency (reliability anchors §6)."""
    return {"status": "ok"}


@probes.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Readiness: 200 only while the orchestrator reports SERVING (it does so only when
    Triton and its models are ready)."""
    ready, detail = await _serving(request).readiness()
    if ready:
        return JSONResponse({"status": "ready", "detail": detail})
    return error_response("UNAVAILABLE", f"not ready: {detail}")


@probes.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app. The orchestrator channel opens in the lifespan and closes with it."""
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serving = GatewayServing(settings)
        try:
            yield
        finally:
            await app.state.serving.close()

    # No /docs, /redoc or /openapi.json: the probes and /metrics are the only routes
    # without a key (reliability anchors §8.1). The schema is still ``app.openapi()``.
    app = FastAPI(title="Step-Audio 2 gateway", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(probes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn; port 0 picks a free port (read it back with
    ``getsockname()``), so callers know the address before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: FastAPI, *, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app``; run it with ``await server.serve(sockets=[sock])``."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, server_header=False, timeout_graceful_shutdown=10,
                            lifespan="on")
    return uvicorn.Server(config)


def main() -> None:
    """Run the gateway alone (a gateway pod): ``python -m stepaudio2.gateway.app``."""
    logging.basicConfig(level=logging.INFO)
    settings = GatewaySettings()
    sock = bind_socket(settings.host, settings.port)
    _LOGGER.info("gateway on http://%s:%d -> orchestrator %s", settings.host, sock.getsockname()[1],
                 settings.orchestrator_address)
    asyncio.run(uvicorn_server(create_app(settings)).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
