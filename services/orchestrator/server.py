"""The orchestrator process: the public gRPC API (``stepaudio2.v1.Assistant``) on grpc.aio.

Entry points:

* ``await create_server(settings)`` -> ``(OrchestratorServer, port)``: build everything and
  bind (port 0 picks a free one), not started yet; ``await server.start()``,
  ``await server.stop(grace)``;
* ``await serve(settings)``: run until SIGINT/SIGTERM, then shut down gracefully;
* :func:`start_in_thread` -> :class:`BackgroundOrchestrator`: a running server on its own
  event loop in a daemon thread, for tests and for ``stepaudio2 up``;
* ``python -m stepaudio2.orchestrator.server`` (settings from ``STEPAUDIO2_ORCH_*``).

Health (``grpc.health.v1``): ``""`` and ``stepaudio2.v1.Assistant`` report readiness -
SERVING once Triton and both models are ready (re-checked every ``readiness_poll_s``);
``liveness`` is SERVING while the process runs and never depends on Triton (reliability
§2.3). Shutdown flips every status to NOT_SERVING first, then stops the server with a grace
period for in-flight calls. Health and reflection need no API key.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.orchestrator.auth import ApiKeyInterceptor, ApiKeyStore
from stepaudio2.orchestrator.service import AssistantService, open_orchestrator_voices
from stepaudio2.orchestrator.settings import OrchestratorSettings
from stepaudio2.runtime.errors import InvalidArgument, StepAudio2Error
from stepaudio2.runtime.triton_client import TritonClients
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = assistant_pb2.DESCRIPTOR.services_by_name["Assistant"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS = "liveness"     # health service name for liveness probes
READINESS = ("", SERVICE_NAME)  # health service names that follow Triton's readiness

# -- gRPC server options (reliability §2.4, §2.5) ---------------------------------------------
# Largest response: transcripts are text; 16 MiB holds many hours of it.
MAX_SEND_MESSAGE_BYTES = 16 * 1024 * 1024
# Protobuf envelope around the audio bytes of the largest accepted request; the receive
# limit is settings.max_request_bytes plus this. Bigger messages are refused by gRPC itself
# (RESOURCE_EXHAUSTED) before they are buffered.
REQUEST_ENVELOPE_BYTES = 64 * 1024
# Ping clients every 30 s and drop them when no ack comes within 10 s: a vanished client's
# long transcription is cancelled (and its Triton streams with it) instead of running on.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Keep pinging during long silent calls (a unary Transcribe sends nothing until the end);
# gRPC's default stops after 2 pings without data.
MAX_PINGS_WITHOUT_DATA = 0
# Accept client keepalive pings as often as every 10 s, even with no call in flight
# (gRPC's default 5 min would answer clients that ping more often with GOAWAY).
MIN_CLIENT_PING_INTERVAL_MS = 10_000
PERMIT_KEEPALIVE_WITHOUT_CALLS = 1
# Recycle connections after 10 min so clients re-resolve and spread over new replicas
# behind L4 load balancers ...
MAX_CONNECTION_AGE_MS = 10 * 60_000
# ... while calls in flight on an aged connection get up to an hour (a long transcription).
MAX_CONNECTION_AGE_GRACE_MS = 60 * 60_000
# Close connections idle for 5 minutes.
MAX_CONNECTION_IDLE_MS = 5 * 60_000
# gRPC sets SO_REUSEPORT by default, so a second orchestrator on the same port would
# silently share it; off, binding a taken port fails at start-up.
SO_REUSEPORT = 0
# RPCs handled at once by one process; beyond it new calls fail fast with RESOURCE_EXHAUSTED
# instead of queueing without bound.
MAX_CONCURRENT_RPCS = 256


def server_options(settings: OrchestratorSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes + REQUEST_ENVELOPE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", MAX_PINGS_WITHOUT_DATA),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", PERMIT_KEEPALIVE_WITHOUT_CALLS),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.so_reuseport", SO_REUSEPORT),
    ]


class OrchestratorServer:
    """A bound (not yet started) orchestrator: the grpc.aio server, its health servicer,
    the Triton clients and the readiness watcher."""

    def __init__(self, grpc_server: grpc.aio.Server, health_servicer, triton: TritonClients,
                 settings: OrchestratorSettings, port: int):
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.triton = triton
        self.settings = settings
        self.port = port
        self._watcher: asyncio.Task | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_ready(False)
        await self.grpc_server.start()
        self._watcher = asyncio.create_task(self._watch_triton(), name="orchestrator-readiness")
        _LOGGER.info("orchestrator serving %s on %s (Triton at %s)", self.settings.served_model_id,
                     self.address, self.triton.url)

    async def _set_ready(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS:
            await self.health.set(name, status)

    async def _watch_triton(self) -> None:
        ready: bool | None = None
        while True:
            ok = await self.triton.ready()
            if ok != ready:
                (_LOGGER.info if ok else _LOGGER.warning)(
                    "Triton at %s is %s", self.triton.url, "ready" if ok else "not ready")
                await self._set_ready(ok)
                ready = ok
            await asyncio.sleep(self.settings.readiness_poll_s)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING (load balancers drain), then stop accepting calls and give
        in-flight ones ``grace`` seconds (default: settings.grace_period_s)."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.grpc_server.stop(self.settings.grace_period_s if grace is None else grace)
        await self.triton.close()
        _LOGGER.info("orchestrator on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(settings: OrchestratorSettings, *,
                        triton: TritonClients | None = None) -> tuple[OrchestratorServer, int]:
    """Build the orchestrator and bind its port (``settings.port`` 0 picks a free one).

    Fails fast on a bad configuration: an unreadable tokenizer, API key sources that do not
    parse, or no API key at all without ``allow_unauthenticated``.
    """
    tokenizer = StepAudioTokenizer.from_dir(settings.model_dir)
    keys = ApiKeyStore.from_settings(settings)
    if not len(keys):
        if not settings.allow_unauthenticated:
            raise InvalidArgument("no API key configured: set STEPAUDIO2_ORCH_API_KEYS, _API_KEYS_FILE or "
                                  "_API_KEYS_DIR (or STEPAUDIO2_ORCH_ALLOW_UNAUTHENTICATED=true for local "
                                  "development)", field="api_keys")
        _LOGGER.warning("serving WITHOUT authentication (allow_unauthenticated)")
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys)] if len(keys) else [],
                             options=server_options(settings), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    try:
        port = server.add_insecure_port(settings.address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"cannot listen on {settings.address}")
    triton = triton or TritonClients(settings.triton_url, keepalive_s=settings.triton_keepalive_s)
    assistant_pb2_grpc.add_AssistantServicer_to_server(
        AssistantService(settings, tokenizer, triton, voices=open_orchestrator_voices(settings)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
    return OrchestratorServer(server, health_servicer, triton, settings, port), port


async def serve(settings: OrchestratorSettings | None = None) -> None:
    """Run the orchestrator until SIGINT/SIGTERM, then shut down gracefully."""
    settings = settings or OrchestratorSettings()
    server, _ = await create_server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
            pass
    try:
        await stop.wait()
    finally:
        await server.stop()


class BackgroundOrchestrator:
    """A started orchestrator on its own event loop in a daemon thread.

    ``port`` / ``address`` say where it listens; :meth:`stop` shuts it down and joins the
    thread (also on ``with``-block exit).
    """

    START_TIMEOUT_S = 60.0

    def __init__(self, settings: OrchestratorSettings):
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orchestrator", daemon=True)
        self._thread.start()
        try:
            self.server, self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(
                self.START_TIMEOUT_S)
        except BaseException:
            self._close_loop()
            raise

    async def _start(self) -> tuple[OrchestratorServer, int]:
        server, port = await create_server(self.settings)
        await server.start()
        return server, port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def stop(self, grace: float | None = 0.0) -> None:
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(
                (grace or 0) + self.START_TIMEOUT_S)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "BackgroundOrchestrator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(settings: OrchestratorSettings) -> BackgroundOrchestrator:
    """Start an orchestrator in a background thread; returns once it is listening."""
    return BackgroundOrchestrator(settings)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = OrchestratorSettings()
    except Exception as exc:  # pydantic ValidationError: name the variables that are wrong
        print(f"invalid orchestrator settings (STEPAUDIO2_ORCH_*):\n{exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except StepAudio2Error as err:
        print(f"error ({err.code}): {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
