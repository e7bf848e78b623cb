"""The HTTP gateway against the real stack: tritonserver (the shared ``triton`` fixture),
the orchestrator and the gateway in-process (``LocalStack``), called with the official
``openai`` SDK and with plain HTTP for what the SDK cannot send. Also ``stepaudio2 up``
as a subprocess, stopped with SIGTERM."""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from stepaudio2.gateway.server_utils import FORM_FIELDS_BUDGET
from stepaudio2.gateway.settings import GatewaySettings
from stepaudio2.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
WAV = ROOT / "assets" / "demo_digits.wav"
# A small upload limit keeps the over-the-limit tests cheap; the demo WAV is ~110 KB.
LIMIT = 1024 * 1024
# One network read may overshoot the limit by a chunk before the count trips: asyncio's
# socket transport reads up to 256 KiB at once (seen under load in CI).
READ_SLACK = 256 * 1024


@pytest.fixture(scope="module")
def stack(triton, tiny_ckpt):
    with LocalStack(tiny_ckpt, triton_server=triton, gateway_options={"max_upload_bytes": LIMIT}) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.http_url, timeout=120) as c:
        yield c


def _auth(stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


def _assert_still_serves(client, stack) -> None:
    """After a refused request, a good one still succeeds."""
    with WAV.open("rb") as f:
        out = client.audio.transcriptions.create(model=stack.model_id, file=f)
    assert isinstance(out.text, str)


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def _metric(text: str, name: str, **labels) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{sel}}}" if labels else name) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# ---- the OpenAI SDK, every response format --------------------------------------------------

def test_openai_sdk_every_response_format(client, stack):
    results = {}
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        with WAV.open("rb") as f:
            results[fmt] = client.audio.transcriptions.create(model=stack.model_id, file=f, response_format=fmt)
    text = results["json"].text
    assert isinstance(text, str)
    assert results["json"].usage.type == "duration" and 3.0 < results["json"].usage.seconds < 4.0
    assert results["text"] == text  # greedy decoding: the same transcript every time
    verbose = results["verbose_json"]
    assert verbose.text == text and verbose.language == "und" and 3.0 < verbose.duration < 4.0
    assert len(verbose.segments) == 1
    seg = verbose.segments[0]
    assert (seg.id, seg.start) == (0, 0.0) and abs(seg.end - verbose.duration) < 0.05 and seg.text == text
    srt, vtt = results["srt"], results["vtt"]
    assert isinstance(srt, str) and vtt.startswith("WEBVTT\n\n")
    if text.strip():
        assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\n.+", srt)
        assert re.search(r"^00:00:00\.000 --> 00:00:0\d\.\d{3}$", vtt, re.MULTILINE)


def test_language_and_prompt_pass_through(client, stack):
    with WAV.open("rb") as f:
        out = client.audio.transcriptions.create(model=stack.model_id, file=f, response_format="verbose_json",
                                                 language="en", prompt="digits", temperature=0.0)
    assert out.language == "en"


def test_models(client, stack, http):
    assert [m.id for m in client.models.list().data] == [stack.model_id]
    body = http.get("/v1/models", headers=_auth(stack)).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == stack.model_id and body["data"][0]["object"] == "model"
    assert http.get(f"/v1/models/{stack.model_id}", headers=_auth(stack)).json()["id"] == stack.model_id
    _error(http.get("/v1/models/other", headers=_auth(stack)), 404, "NOT_FOUND")


# ---- refusals: each one alone, and the stack still serves after it ----------------------------

def test_missing_key_is_refused_at_the_gateway(client, stack, http):
    err = _error(http.get("/v1/models"), 401, "UNAUTHENTICATED")
    assert err["type"] == "authentication_error"
    with WAV.open("rb") as f:
        resp = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", f)}, data={"model": stack.model_id})
    _error(resp, 401, "UNAUTHENTICATED")
    assert resp.headers["www-authenticate"] == "Bearer"
    _error(http.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "UNAUTHENTICATED")
    _assert_still_serves(client, stack)


def test_wrong_key_is_refused_by_the_orchestrator(client, stack, http):
    bad = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info, WAV.open("rb") as f:
        bad.audio.transcriptions.create(model=stack.model_id, file=f)
    assert info.value.status_code == 401 and info.value.body["code"] == "UNAUTHENTICATED"
    _error(http.get("/v1/models", headers={"Authorization": "Bearer not-the-key"}), 401, "UNAUTHENTICATED")
    _assert_still_serves(client, stack)


def test_unknown_model_is_404(client, stack):
    with pytest.raises(openai.NotFoundError) as info, WAV.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert info.value.body["code"] == "NOT_FOUND" and info.value.body["param"] == "model"
    _assert_still_serves(client, stack)


def test_garbage_bytes_are_415(client, stack, http):
    resp = http.post("/v1/audio/transcriptions", headers=_auth(stack),
                     files={"file": ("noise.wav", os.urandom(4096))})
    err = _error(resp, 415, "UNSUPPORTED_MEDIA")
    assert err["param"] == "file"
    _assert_still_serves(client, stack)


def test_empty_file_is_400(client, stack, http):
    resp = http.post("/v1/audio/transcriptions", headers=_auth(stack), files={"file": ("empty.wav", b"")})
    assert _error(resp, 400, "INVALID_ARGUMENT")["param"] == "file"
    _error(http.post("/v1/audio/transcriptions", headers=_auth(stack), data={"model": stack.model_id}),
           400, "INVALID_ARGUMENT")  # no file at all
    with WAV.open("rb") as f:
        resp = http.post("/v1/audio/transcriptions", headers=_auth(stack), files={"file": ("a.wav", f)},
                         data={"response_format": "xml"})
    assert _error(resp, 400, "INVALID_ARGUMENT")["param"] == "response_format"
    _assert_still_serves(client, stack)


def _upload_bytes_read(http) -> tuple[float, float]:
    text = http.get("/metrics").text
    return (_metric(text, "stepaudio2_gateway_upload_read_bytes_sum"),
            _metric(text, "stepaudio2_gateway_upload_read_bytes_count"))


def test_too_large_with_content_length_is_413_before_the_body_is_read(client, stack, http):
    # 1 byte over the limit, sent in full by a normal client.
    before = _upload_bytes_read(http)
    resp = http.post("/v1/audio/transcriptions", headers=_auth(stack),
                     files={"file": ("big.wav", b"RIFF" + b"\0" * (LIMIT - 3))})
    _error(resp, 413, "TOO_LARGE")
    after = _upload_bytes_read(http)
    assert after[1] == before[1] + 1 and after[0] - before[0] <= LIMIT + FORM_FIELDS_BUDGET + READ_SLACK

    # A declared Content-Length over the limit is answered before one body byte is sent.
    host, port = urlparse(stack.http_url).hostname, urlparse(stack.http_url).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {stack.api_key}\r\n"
                      f"Content-Type: multipart/form-data; boundary=xyz\r\n"
                      f"Content-Length: {100 * LIMIT}\r\n\r\n").encode())
        answer = b""
        while b'"TOO_LARGE"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert _upload_bytes_read(http)[0] == after[0]  # nothing read for it
    _assert_still_serves(client, stack)


def test_too_large_chunked_is_413_after_reading_about_the_limit(client, stack, http):
    # Within what the gateway drains after answering (max_upload_bytes), so the client,
    # which reads only once it has sent everything, reliably sees the 413; a longer body
    # is cut off and its sender may see a reset instead (LingeringErrorResponse).
    total = LIMIT * 7 // 4  # > LIMIT + FORM_FIELDS_BUDGET + READ_SLACK: stopping early is observable
    sent = 0

    def body():
        nonlocal sent
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\nRIFF'
        while sent < total:
            sent += 16384
            yield b"\0" * 16384
        yield b"\r\n--xyz--\r\n"

    before = _upload_bytes_read(http)
    resp = http.post("/v1/audio/transcriptions", content=body(),
                     headers={**_auth(stack), "Content-Type": "multipart/form-data; boundary=xyz"})
    assert "content-length" not in resp.request.headers  # really chunked
    _error(resp, 413, "TOO_LARGE")
    after = _upload_bytes_read(http)
    # The gateway stopped reading at the limit (plus one network read), not at the end.
    assert after[1] == before[1] + 1
    assert LIMIT < after[0] - before[0] <= LIMIT + FORM_FIELDS_BUDGET + READ_SLACK
    _assert_still_serves(client, stack)


# ---- probes, metrics, request ids --------------------------------------------------------------

def test_probes_need_no_key(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_count_requests_by_route_and_status(client, stack, http):
    _assert_still_serves(client, stack)
    http.get("/v1/models")  # a 401
    text = http.get("/metrics").text
    assert _metric(text, "stepaudio2_gateway_requests_total", method="POST", route="/v1/audio/transcriptions",
                   status="200") >= 1
    assert _metric(text, "stepaudio2_gateway_requests_total", method="GET", route="/v1/models", status="401") >= 1
    assert "stepaudio2_gateway_request_duration_seconds_bucket" in text


def test_request_id_is_returned(stack, http):
    resp = http.get("/v1/models", headers={**_auth(stack), "X-Request-Id": "test-req-42"})
    assert resp.headers["x-request-id"] == "test-req-42"
    generated = http.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    replaced = http.get("/healthz", headers={"X-Request-Id": "bad id;" + "x" * 200}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


# ---- no orchestrator ------------------------------------------------------------------------------

def test_orchestrator_unreachable_is_503():
    from fastapi.testclient import TestClient

    from stepaudio2.gateway.app import create_app

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    app = create_app(GatewaySettings(orchestrator_address=dead, readiness_timeout_s=1.0))
    with TestClient(app) as c:
        resp = c.post("/v1/audio/transcriptions", headers={"Authorization": "Bearer k"},
                      files={"file": ("a.wav", WAV.read_bytes())})
        err = _error(resp, 503, "UNAVAILABLE")
        assert dead in err["message"] and "unreachable" in err["message"]
        _error(c.get("/readyz"), 503, "UNAVAILABLE")
        assert c.get("/healthz").status_code == 200


# ---- `stepaudio2 up` as a subprocess -------------------------------------------------------------

def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_stepaudio2_up_serves_and_stops_on_sigterm(tiny_ckpt):
    exe = Path(sys.executable).with_name("stepaudio2")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "stepaudio2.cli"]),
           "up", "--model-dir", str(tiny_ckpt), "--http-port", "0", "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 300
        while not any(ln.startswith("ready") for ln in seen):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        out = "".join(seen)
        base = re.search(r"HTTP \(OpenAI-compatible\)\s+(http://\S+)/v1", out).group(1)
        key = re.search(r"API key\s+(\S+)", out).group(1)
        triton_pid = int(re.search(r"tritonserver pid (\d+)", out).group(1))
        work_dir = re.search(r"log (/\S+)/triton/tritonserver\.log", out).group(1)
        assert re.search(r"gRPC \(stepaudio2\.v1\)\s+127\.0\.0\.1:\d+", out)

        with httpx.Client(base_url=base, timeout=120) as c:
            assert c.get("/readyz").status_code == 200
            resp = c.post("/v1/audio/transcriptions", headers={"Authorization": f"Bearer {key}"},
                          files={"file": ("a.wav", WAV.read_bytes())}, data={"response_format": "text"})
            assert resp.status_code == 200, resp.text
        assert _pids_mentioning(work_dir), "Triton's processes should mention the stack's work folder"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not Path(f"/proc/{triton_pid}").exists(), "tritonserver outlived `stepaudio2 up`"
    assert _pids_mentioning(work_dir) == [], "tritonserver or its Python stubs outlived `stepaudio2 up`"
    assert not Path(work_dir).exists()
