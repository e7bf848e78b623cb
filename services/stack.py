"""`stepaudio2 up`: the whole local stack in the foreground (issue 3), and
:class:`LocalStack`, the same stack as a context manager for tests and the demo.

Layout of a running stack::

    HTTP client --> gateway (FastAPI/uvicorn) --gRPC--> orchestrator (grpc.aio) --gRPC--> tritonserver
                    thread "gateway"                    thread "orchestrator"              child process

Triton is a child process (it is a separate binary, started by
:class:`~stepaudio2.runtime.triton.TritonServer` in its own process group). The
orchestrator and the gateway run in *this* process, each on its own asyncio loop in a
background thread, through the same entry points their pods use (``create_server``,
``create_app``). Why not child processes for them too: both are torch-free asyncio
services, so in-process they start in a fraction of a second instead of paying two more
interpreter start-ups (grpc, FastAPI imports) on a 2-core machine; ports chosen with 0
are read back directly instead of through a stdout/port-file handshake; and one signal
handler stops everything in order (gateway, orchestrator, Triton) with nothing left to
orphan but Triton, which is stopped (and its process group killed if need be) last.
Production runs each piece as its own Deployment with the same code.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

_LOGGER = logging.getLogger(__name__)

# The tenant the generated (or given) key belongs to in the orchestrator's key store.
LOCAL_TENANT = "local"


def generate_api_key() -> str:
    """A fresh random API key (URL-safe, no ',' or ':' so it fits the key-store syntax)."""
    return "sa2-" + secrets.token_urlsafe(24)


class _BackgroundGateway:
    """The gateway app served by uvicorn on its own event loop in a daemon thread."""

    START_TIMEOUT_S = 30.0

    def __init__(self, settings, *, log_level: str):
        from stepaudio2.gateway.app import bind_socket, create_app, uvicorn_server

        self.settings = settings
        self.sock = bind_socket(settings.host, settings.port)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn_server(create_app(settings), log_level=log_level)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not start on {settings.host}:{self.port}: "
                                   f"{self._error or 'see the log above'}")
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # reported by __init__ / stop
            self._error = exc

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(self.server.config.timeout_graceful_shutdown + 10)
        self.sock.close()


class LocalStack:
    """Triton + orchestrator + gateway on loopback, for ``stepaudio2 up``, tests and the demo.

    ::

        with LocalStack(model_dir) as stack:        # ports 0 = free ports
            stack.http_url       # "http://127.0.0.1:PORT" (the OpenAI base URL is http_url + "/v1")
            stack.grpc_address   # "127.0.0.1:PORT"
            stack.api_key        # generated when not given

    ``start`` returns once the gateway's ``/readyz`` is 200, i.e. every model is loaded;
    ``stop`` (also on ``with`` exit, and when ``start`` fails half-way) stops the gateway,
    the orchestrator and Triton in that order and removes the temporary work folder.
    ``gateway_options`` / ``orchestrator_options`` override settings fields
    (``GatewaySettings``, ``OrchestratorSettings``); ``repo_options`` go to
    ``build_model_repo`` (e.g. ``num_threads=1``). ``triton_server``: use this running
    :class:`~stepaudio2.runtime.triton.TritonServer` instead of starting one (not stopped).
    """

    def __init__(self, model_dir: str | Path | None = None, *, http_port: int = 0, grpc_port: int = 0,
                 api_key: str | None = None, host: str = "127.0.0.1", triton_http_port: int = 0,
                 triton_grpc_port: int = 0, triton_metrics_port: int = 0, device: str = "cpu",
                 work_dir: str | Path | None = None, repo_options: Mapping[str, Any] | None = None,
                 gateway_options: Mapping[str, Any] | None = None,
                 orchestrator_options: Mapping[str, Any] | None = None,
                 triton_server=None, ready_timeout_s: float = 300.0, log_level: str = "warning",
                 voices_dir: str | Path | None = None):
        if model_dir is None:
            from stepaudio2.cli import _resolve_model_dir

            model_dir = _resolve_model_dir(None)
        self.model_dir = Path(model_dir).resolve()
        self.host = host
        self.api_key = api_key or generate_api_key()
        self.api_key_generated = api_key is None
        self.device = device
        self._ports = {"http": http_port, "grpc": grpc_port, "triton_http": triton_http_port,
                       "triton_grpc": triton_grpc_port, "triton_metrics": triton_metrics_port}
        self._own_work_dir = work_dir is None
        self._work_dir_arg = Path(work_dir) if work_dir else None
        self.work_dir: Path | None = None
        self.repo_options = dict(repo_options or {})
        self.gateway_options = dict(gateway_options or {})
        self.orchestrator_options = dict(orchestrator_options or {})
        # The voice library, shared by token2wav (in Triton) and the orchestrator: the given
        # folder; else S3 when STEPAUDIO2_VOICES_S3_ENDPOINT is set; else the local default.
        from stepaudio2.runtime.voice_store import VoiceStoreSettings

        vs = VoiceStoreSettings()
        if voices_dir is None:     # a given server knows its library (test fixtures set it)
            voices_dir = getattr(triton_server, "voices_dir", None)
        if voices_dir is None and not vs.s3_endpoint:
            voices_dir = vs.local_folder
        self.voices_dir = Path(voices_dir).resolve() if voices_dir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.log_level = log_level
        # An already running TritonServer serving this checkpoint (e.g. a test fixture) is
        # used as is and left running on stop; otherwise the stack builds and owns one.
        self.triton = triton_server
        self._own_triton = triton_server is None
        self.orchestrator = None
        self.gateway: _BackgroundGateway | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        self._require(self.gateway, "gateway")
        return f"http://{_url_host(self.host)}:{self.gateway.port}"

    @property
    def grpc_address(self) -> str:
        self._require(self.orchestrator, "orchestrator")
        return f"{self.host}:{self.orchestrator.port}"

    @property
    def model_id(self) -> str:
        self._require(self.orchestrator, "orchestrator")
        return self.orchestrator.settings.served_model_id

    @property
    def serves_speech(self) -> bool:
        """Whether the checkpoint has token2wav (text to speech and voices)."""
        from stepaudio2.runtime.model_repo import checkpoint_models

        return checkpoint_models(self.model_dir)["token2wav"] is None

    def endpoints(self) -> dict[str, str]:
        """Every address of the running stack, for printing."""
        t = self.triton.urls
        return {
            "openai_base_url": f"{self.http_url}/v1",
            "transcriptions": f"{self.http_url}/v1/audio/transcriptions",
            "speech": f"{self.http_url}/v1/audio/speech",
            "voices": f"{self.http_url}/v1/audio/voices",
            "models": f"{self.http_url}/v1/models",
            "healthz": f"{self.http_url}/healthz",
            "readyz": f"{self.http_url}/readyz",
            "metrics": f"{self.http_url}/metrics",
            "grpc": self.grpc_address,
            "triton_http": t.http_base,
            "triton_grpc": t.grpc,
            "triton_metrics": t.metrics,
        }

    @staticmethod
    def _require(part, name: str) -> None:
        if part is None:
            raise RuntimeError(f"the stack is not started: no {name} yet")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "LocalStack":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from pydantic import SecretStr

        from stepaudio2.gateway.settings import GatewaySettings
        from stepaudio2.orchestrator.server import start_in_thread
        from stepaudio2.orchestrator.settings import OrchestratorSettings
        from stepaudio2.runtime.model_repo import build_model_repo
        from stepaudio2.runtime.triton import TritonServer

        self.work_dir = self._work_dir_arg or Path(tempfile.mkdtemp(prefix="stepaudio2-stack-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.ready_timeout_s
        if self._own_triton:
            repo = build_model_repo(self.model_dir, self.work_dir / "model_repository", device=self.device,
                                    **{"voices_dir": str(self.voices_dir) if self.voices_dir else None,
                                       **self.repo_options})
            self.triton = TritonServer(repo, host=self.host, http_port=self._ports["triton_http"],
                                       grpc_port=self._ports["triton_grpc"],
                                       metrics_port=self._ports["triton_metrics"], work_dir=self.work_dir / "triton")
            self.triton.start()
        self.triton.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        orch = OrchestratorSettings(**{
            "host": self.host, "port": self._ports["grpc"], "triton_url": self.triton.urls.grpc,
            "model_dir": self.model_dir, "api_keys": SecretStr(f"{LOCAL_TENANT}:{self.api_key}"),
            "voices_dir": self.voices_dir, **self.orchestrator_options})
        self.orchestrator = start_in_thread(orch)
        gw = GatewaySettings(**{"host": self.host, "port": self._ports["http"],
                                "orchestrator_address": f"{self.host}:{self.orchestrator.port}",
                                **self.gateway_options})
        self.gateway = _BackgroundGateway(gw, log_level=self.log_level)
        self.wait_ready(max(1.0, deadline - time.monotonic()))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> "LocalStack":
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.triton.proc is None or self.triton.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited; log {self.triton.log_file}:\n{self.triton.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack was not ready after {timeout:.0f} s ({self.http_url}/readyz)")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Gateway, then orchestrator, then Triton; each step runs even if one before failed."""
        gateway, self.gateway = self.gateway, None
        orchestrator, self.orchestrator = self.orchestrator, None
        triton = self.triton if self._own_triton else None
        if self._own_triton:
            self.triton = None
        for name, step in (("gateway", gateway and gateway.stop),
                           ("orchestrator", orchestrator and (lambda: orchestrator.stop(grace=2.0))),
                           ("triton", triton and triton.stop)):
            if not step:
                continue
            try:
                step()
            except Exception:  # keep stopping the rest
                _LOGGER.exception("stopping the %s failed", name)
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- `stepaudio2 up` -----------------------------------------------------------------------------

class _Shutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to unwind into ``LocalStack.stop``."""


def _print_banner(stack: LocalStack) -> None:
    e = stack.endpoints()
    key = stack.api_key if stack.api_key_generated else "(the one given with --api-key)"
    lines = [
        f"Step-Audio 2 local stack: model {stack.model_id!r} from {stack.model_dir}",
        f"  HTTP (OpenAI-compatible)  {e['openai_base_url']}",
        f"    POST {e['transcriptions']}",
        *([f"    POST {e['speech']}",
           f"    GET|POST {e['voices']}   DELETE {e['voices']}/{{id}}   (voices in {stack.voices_dir or 'S3'})"]
          if stack.serves_speech else []),
        f"    GET  {e['models']}",
        f"    GET  {e['healthz']}  {e['readyz']}  {e['metrics']}  (no key needed)",
        f"  gRPC (stepaudio2.v1)      {e['grpc']}",
        f"  Triton                    http {e['triton_http']}  grpc {e['triton_grpc']}  metrics {e['triton_metrics']}",
        f"    tritonserver pid {stack.triton.pid}, log {stack.triton.log_file}",
        f"  API key                   {key}",
        "",
        f"  curl {e['transcriptions']} -H 'Authorization: Bearer <API key>' -F file=@audio.wav -F model={stack.model_id}",
        "",
        "ready; Ctrl-C (or SIGTERM) stops everything.",
    ]
    print("\n".join(lines), flush=True)


def cmd_up(args) -> int:
    def on_signal(signum, frame):
        # Ignore repeats while we unwind; stopping is bounded by the parts' own timeouts.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stack = LocalStack(args.model_dir, http_port=args.http_port, grpc_port=args.grpc_port, api_key=args.api_key,
                       host=args.host, triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
                       triton_metrics_port=args.triton_metrics_port, device=args.device,
                       ready_timeout_s=args.ready_timeout, log_level="info" if args.verbose else "warning")
    try:
        print(f"starting Triton, orchestrator and gateway for {stack.model_dir} ...", flush=True)
        stack.start()
        _print_banner(stack)
        while True:
            time.sleep(3600)
    except _Shutdown as sig:
        print(f"\n{sig}: stopping ...", flush=True)
    except (OSError, RuntimeError, TimeoutError) as exc:  # a port in use, a part that did not start
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    print("stopped", flush=True)
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `stepaudio2` argument parser."""
    s = sub.add_parser("up", help="run Triton + orchestrator + gateway in the foreground (local stack)")
    s.add_argument("--model-dir", default=None,
                   help="checkpoint folder (default: STEPAUDIO2_MODEL_DIR, else a tiny random checkpoint)")
    s.add_argument("--host", default="127.0.0.1", help="address every part listens on (default 127.0.0.1)")
    s.add_argument("--http-port", type=int, default=8000, help="gateway HTTP port (default 8000; 0 = a free port)")
    s.add_argument("--grpc-port", type=int, default=50051, help="orchestrator gRPC port (default 50051; 0 = a free port)")
    s.add_argument("--api-key", default=None, help="the API key callers must send (default: generate one)")
    s.add_argument("--triton-http-port", type=int, default=0, help="Triton HTTP port (default 0 = a free port)")
    s.add_argument("--triton-grpc-port", type=int, default=0, help="Triton gRPC port (default 0 = a free port)")
    s.add_argument("--triton-metrics-port", type=int, default=0, help="Triton metrics port (default 0 = a free port)")
    s.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where Triton runs the models")
    s.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every model to load")
    s.add_argument("-v", "--verbose", action="store_true", help="info-level logs from every part")
    s.set_defaults(fn=cmd_up)


if __name__ == "__main__":  # pragma: no cover
    from stepaudio2.cli import main

    sys.exit(main(["up", *sys.argv[1:]]))
