"""HTTP plumbing of the gateway in one place (practice 10): request ids, API-key presence,
metrics, error responses, the size-limited multipart reader, cancellation on disconnect.

The middleware is pure ASGI (no BaseHTTPMiddleware), so it never buffers a body.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stepaudio2.gateway.protocol import ErrorInfo, ErrorResponse
from stepaudio2.gateway.serving import ApiError
from stepaudio2.runtime.errors import ERROR_TABLE, AudioTooLarge, InvalidArgument, StepAudio2Error, Unauthenticated

_LOGGER = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# An incoming request id is kept when it is short and plain; anything else is replaced,
# so ids are safe in logs and in gRPC metadata.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# RFC 6750 token68-ish: printable ASCII without spaces (gRPC metadata must be ASCII).
_BEARER_RE = re.compile(r"^Bearer\s+([\x21-\x7e]+)\s*$", re.IGNORECASE)
# Bytes a transcription request may carry beyond the audio file itself: multipart
# boundaries and part headers plus the text fields (model, prompt, ...).
FORM_FIELDS_BUDGET = 64 * 1024
# Longest time an early error response waits for the rest of an unread body.
LINGER_S = 5.0


# ---- errors ---------------------------------------------------------------------------------

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def _error_payload(code: str, message: str, param: str | None) -> tuple[int, dict]:
    """(HTTP status of ``ERROR_TABLE[code]``, OpenAI's error body)."""
    status = ERROR_TABLE[code].http
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(code: str, message: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape with the HTTP status of ``ERROR_TABLE[code]``."""
    status, body = _error_payload(code, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def _body_unread(request: Request) -> bool:
    """Whether the request still has body bytes nobody read (refused early)."""
    complete = getattr(request.state, "body_complete", None)
    if complete is not None:
        return not complete
    h = request.headers
    return h.get("content-length", "0") != "0" or "chunked" in h.get("transfer-encoding", "").lower()


class LingeringErrorResponse(JSONResponse):
    """An error answered before the request body was read (413 over the limit, 401).

    The response goes out at once; then up to ``linger_bytes`` (or ``LINGER_S``) of the
    unread body are read and thrown away before the connection closes. Closing a socket
    that still has unread input makes the kernel send RST, and a client still writing
    its body often loses the response with it: on loopback, 72 of 100 keep-alive httpx
    clients saw "connection reset" instead of the 413 when the server closed at once.
    Nothing read here is kept, and the linger is bounded (an endless chunked body is cut
    off), like nginx's lingering close.
    """

    def __init__(self, content, *, status_code: int, headers: dict[str, str], linger_bytes: int):
        super().__init__(content, status_code=status_code, headers={**headers, "Connection": "close"})
        self.linger_bytes = linger_bytes

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_S
        discarded = 0
        try:
            while discarded <= self.linger_bytes and loop.time() < deadline:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
                if message["type"] != "http.request":
                    break
                discarded += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def error_response_before_body(code: str, message: str, *, param: str | None = None,
                               headers: dict[str, str] | None = None, linger_bytes: int) -> JSONResponse:
    """``error_response`` for a request whose body is still (partly) unread."""
    status, body = _error_payload(code, message, param)
    return LingeringErrorResponse(body, status_code=status, headers=dict(headers or {}), linger_bytes=linger_bytes)


async def _stepaudio2_error_handler(request: Request, exc: StepAudio2Error) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == "UNAUTHENTICATED" else {}
    if _body_unread(request):
        return error_response_before_body(exc.code, exc.reason, param=exc.field, headers=headers,
                                          linger_bytes=request.app.state.settings.max_upload_bytes)
    return error_response(exc.code, exc.reason, param=exc.field, headers=headers)


async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
    return error_response("INVALID_ARGUMENT", str(err.get("msg")).removeprefix("Value error, "), param=param)


_CODE_BY_HTTP = {404: "NOT_FOUND", 401: "UNAUTHENTICATED", 413: "TOO_LARGE", 415: "UNSUPPORTED_MEDIA"}


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _CODE_BY_HTTP.get(exc.status_code, "INTERNAL" if exc.status_code >= 500 else "INVALID_ARGUMENT")
    resp = error_response(code, str(exc.detail), headers=dict(exc.headers or {}))
    resp.status_code = exc.status_code  # e.g. 405 keeps its own status
    return resp


def install_error_handlers(app) -> None:
    app.add_exception_handler(StepAudio2Error, _stepaudio2_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)


# ---- metrics --------------------------------------------------------------------------------

class GatewayMetrics:
    """Prometheus metrics of one app, in the app's own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("method", "route", "status")
        self.requests = Counter("stepaudio2_gateway_requests", "HTTP requests answered, by route and status.",
                                labels, registry=self.registry)
        self.latency = Histogram("stepaudio2_gateway_request_duration_seconds",
                                 "Time from request start to the last response byte.", labels,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                 registry=self.registry)
        self.in_progress = Gauge("stepaudio2_gateway_requests_in_progress", "Requests being handled.",
                                 registry=self.registry)
        # Text to speech: time to first audio (the TTS latency users feel) and how each
        # stream ended (complete | client_left | failed).
        self.speech_first_audio = Histogram("stepaudio2_gateway_speech_first_audio_seconds",
                                            "Time from request start to the first audio bytes of /v1/audio/speech.",
                                            buckets=(.05, .1, .25, .5, 1, 2, 3, 5, 10, 30), registry=self.registry)
        self.speech_streams = Counter("stepaudio2_gateway_speech_streams", "Speech bodies streamed, by how they "
                                      "ended.", ("outcome",), registry=self.registry)
        self.speech_audio_bytes = Counter("stepaudio2_gateway_speech_audio_bytes", "Speech body bytes sent.",
                                          registry=self.registry)
        # Bytes of request body read per upload, rejected ones included: shows that an
        # oversized upload is refused after about max_upload_bytes, not after all of it.
        self.upload_bytes = Histogram("stepaudio2_gateway_upload_read_bytes",
                                      "Request-body bytes read per transcription upload.",
                                      buckets=tuple(4 ** k * 1024 for k in range(1, 10)), registry=self.registry)


def _route_label(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


# ---- middlewares -------------------------------------------------------------------------------

class RequestContextMiddleware:
    """Outermost: request id (accepted or generated, returned, stored for forwarding),
    metrics by route and status, and a JSON 500 for anything unhandled."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            _LOGGER.exception("unhandled error: request_id=%s %s %s", request_id, scope["method"], scope["path"])
            if not started:
                resp = error_response("INTERNAL", f"internal error (request id {request_id})",
                                      headers={"Connection": "close"})
                await resp(scope, receive, send_with_id)
        finally:
            self.metrics.in_progress.dec()
            labels = (scope["method"], _route_label(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - t0)


async def api_key_guard(request: Request) -> None:
    """Dependency of every /v1 route. API keys are passed through: the orchestrator
    validates them. A request without a well-formed ``Authorization: Bearer KEY`` is
    refused here already (401), before its body is read."""
    header = request.headers.get("authorization")
    key = None
    if header is not None:
        m = _BEARER_RE.match(header)
        if not m:
            raise Unauthenticated("malformed Authorization header: send `Authorization: Bearer YOUR_API_KEY`")
        key = m.group(1)
    elif request.app.state.settings.require_api_key:
        raise Unauthenticated("missing API key: send `Authorization: Bearer YOUR_API_KEY`")
    request.state.api_key = key


# ---- uploads ---------------------------------------------------------------------------------

@dataclass
class Upload:
    """A parsed ``multipart/form-data`` body: text fields and the one file."""

    fields: dict[str, str] = field(default_factory=dict)
    file: bytes | None = None
    filename: str = ""
    content_type: str = ""


class _FormCollector:
    """python-multipart callbacks that keep the text fields and the file named ``file``,
    refusing the file as soon as it passes ``max_file_bytes``."""

    def __init__(self, boundary: bytes, max_file_bytes: int):
        self.max_file_bytes = max_file_bytes
        self.upload = Upload()
        self.finished = False
        self._field_bytes = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._is_file = False
        self._data = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field, "on_header_value": self._header_val,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        })

    def _part_begin(self):
        self._headers, self._data, self._is_file, self._name = {}, bytearray(), False, ""

    def _header_field(self, data, start, end):
        self._header_name += data[start:end]

    def _header_val(self, data, start, end):
        self._header_value += data[start:end]

    def _header_end(self):
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise InvalidArgument("a multipart part has no name in its Content-Disposition header")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in options
        if self._is_file:
            if self._name != "file":
                raise InvalidArgument(f"unexpected file field {self._name!r}: send the audio as `file`",
                                      field=self._name)
            if self.upload.file is not None:
                raise InvalidArgument("send exactly one file", field="file")
            self.upload.filename = options[b"filename"].decode("utf-8", "replace")
            self.upload.content_type = self._headers.get(b"content-type", b"").decode("latin-1")

    def _part_data(self, data, start, end):
        n = end - start
        if self._is_file:
            if len(self._data) + n > self.max_file_bytes:
                raise AudioTooLarge(f"the audio file is larger than the limit of {self.max_file_bytes} bytes",
                                    field="file")
        else:
            self._field_bytes += n
            if self._field_bytes > FORM_FIELDS_BUDGET:
                raise InvalidArgument(f"the form's text fields exceed {FORM_FIELDS_BUDGET} bytes", field=self._name)
        self._data += data[start:end]

    def _part_end(self):
        if self._is_file:
            self.upload.file = bytes(self._data)
        else:
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")
        self._data = bytearray()

    def _end(self):
        self.finished = True


async def read_upload(request: Request, max_file_bytes: int, metrics: GatewayMetrics) -> Upload:
    """Read a ``multipart/form-data`` upload, enforcing the size limit before decoding and
    without reading the whole body: a Content-Length over the limit is refused before any
    body byte is read, and a streamed (chunked) body is counted as it arrives, so at most
    ``max_file_bytes + FORM_FIELDS_BUDGET`` (plus one network chunk) is ever read."""
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidArgument("send the request as multipart/form-data with the audio in the `file` field",
                              field="file")
    max_body = max_file_bytes + FORM_FIELDS_BUDGET
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidArgument("invalid Content-Length header")
        if int(declared) > max_body:
            request.state.body_complete = False
            metrics.upload_bytes.observe(0)
            raise AudioTooLarge(f"the request body of {declared} bytes is larger than the limit "
                                f"({max_file_bytes} bytes of audio)", field="file")
    request.state.body_complete = False
    form = _FormCollector(params[b"boundary"], max_file_bytes)
    read = 0
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if read > max_body:
                raise AudioTooLarge(f"the request body is larger than the limit ({max_file_bytes} bytes of audio)",
                                    field="file")
            form.parser.write(chunk)
        request.state.body_complete = True
        form.parser.finalize()
    except FormParserError as exc:
        raise InvalidArgument(f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise ApiError("CANCELLED", "the client closed the connection during the upload") from None
    finally:
        metrics.upload_bytes.observe(read)
    if not form.finished:
        raise InvalidArgument("the multipart body ended before its closing boundary")
    if form.upload.file is None:
        raise InvalidArgument("no audio file: send it in the `file` field", field="file")
    return form.upload


# ---- cancellation -------------------------------------------------------------------------------

async def run_until_disconnect(request: Request, coro):
    """Await ``coro`` unless the client disconnects first; then cancel it (a cancelled
    grpc.aio call cancels the orchestrator's work too). Call only after the body is read."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ApiError("CANCELLED", "the client closed the connection")
