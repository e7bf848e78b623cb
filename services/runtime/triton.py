"""Run a real ``tritonserver`` as a child process: the one bundled in the nvidia-pytriton
wheel (CPU works), for tests, ``stepaudio2 triton`` and local stacks.

The bundled binary needs three environment fixes on a plain machine (setup_facts §3):

* a backend directory of **symlinks** to the wheel's Python backend, its utils module
  and the stub built for *this* Python (copies lose the stub's RPATH);
* ``LD_LIBRARY_PATH`` starting with this interpreter's ``LIBDIR`` (else the stub links
  the system ``libpython`` and runs a mismatched stdlib) plus the wheel's own
  ``nvidia_pytriton.libs``;
* this venv's ``bin`` first on ``PATH``, so the stub's embedded Python resolves
  ``python3`` to the venv and imports our packages (``PYTHONPATH`` is ignored by it).

GPU nodes run the same model repository in NVIDIA's NGC image instead:
:func:`ngc_docker_command`. Torch-free: this module only starts processes.

Usage::

    with TritonServer(repo) as server:          # free loopback ports, waits for ready
        client = tritonclient.grpc.InferenceServerClient(server.urls.grpc)
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Mapping, Sequence

from stepaudio2.runtime.errors import StepAudio2Error

# Triton 2.51.0 (bundled by nvidia-pytriton 0.7.0) = NGC release 24.10.
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
_instances = itertools.count()


class TritonError(StepAudio2Error):
    """tritonserver is missing, did not start, or did not become ready."""

    code = "UNAVAILABLE"


class TritonNotInstalled(TritonError):
    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class TritonUrls:
    """Where a running server listens. ``http`` and ``grpc`` are ``host:port`` as
    ``tritonclient.http`` / ``tritonclient.grpc`` take them; ``metrics`` is the full URL."""

    http: str
    grpc: str
    metrics: str

    @property
    def http_base(self) -> str:
        return f"http://{self.http}"


@dataclass(frozen=True)
class TritonInstall:
    """The parts of nvidia-pytriton's bundled Triton we use."""

    root: Path            # site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: str | None = None) -> Path:
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"

    @property
    def libs(self) -> Path:
        # The wheel's vendored shared libraries (auditwheel layout): site-packages/nvidia_pytriton.libs
        return self.root.parent.parent / "nvidia_pytriton.libs"


def find_triton() -> TritonInstall:
    """Locate the tritonserver bundled in the installed nvidia-pytriton wheel."""
    spec = importlib_util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled("nvidia-pytriton is not installed, so there is no local tritonserver: "
                                 "pip install 'nvidia-pytriton>=0.5' (or `pip install -e .[local]`), or run the "
                                 "model repository in the NGC Triton image (see README, Serving on Triton)")
    inst = TritonInstall(Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    if not inst.binary.is_file():
        raise TritonNotInstalled(f"nvidia-pytriton is installed but {inst.binary} is missing")
    stub = inst.stub()
    if not stub.is_file():
        have = sorted(p.name for p in (inst.root / "python_backend_stubs").glob("*"))
        raise TritonNotInstalled(f"the bundled Python backend has no stub for Python "
                                 f"{sys.version_info.major}.{sys.version_info.minor} (it has {have})")
    return inst


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_backend_dir(install: TritonInstall, dest: Path) -> Path:
    """``dest/python/`` with symlinks to the backend library, its utils and our stub."""
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (install.python_backend / "libtriton_python.so",
                install.python_backend / "triton_python_backend_utils.py",
                install.stub()):
        link = py / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return Path(dest)


def triton_environment(install: TritonInstall, cpu_threads: int | None = None,
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the bundled server and its Python stubs need (module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", ""))
                                             if p)
    venv_bin = str(Path(sys.prefix) / "bin") if sys.prefix != sys.base_prefix else str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
    # One stub process per model instance, each with its own torch thread pool: by
    # default share the cores between them instead of oversubscribing every core.
    threads = cpu_threads or int(env.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 2) // 2)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class TritonServer:
    """A ``tritonserver`` child process on loopback ports.

    Ports left at 0 are picked free at start (and re-picked once if another process
    grabbed one in between). ``work_dir`` (default: a new temporary folder) holds the
    backend symlinks and, unless ``log_file`` says otherwise, ``tritonserver.log`` with
    the output of the server and of its Python stubs (kept after ``stop`` for debugging).
    ``stop`` sends SIGTERM (Triton then waits up to ``exit_timeout_s`` for in-flight
    requests), SIGKILLs the process group after a grace period, and reaps stubs that
    hang in shutdown. Note: Triton 2.51 does not count a decoupled (streaming) Python
    model's open streams as in-flight; it keeps the model alive while they run, up to
    ``exit_timeout_s``, then exits hard and the streams are cut.
    """

    def __init__(self, model_repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, work_dir: str | Path | None = None,
                 log_file: str | Path | None = None, exit_timeout_s: int = 10, cpu_threads: int | None = None,
                 log_verbose: int = 0, model_control_mode: str = "none", load_models: Sequence[str] = (),
                 gpu_metrics: bool = False, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None):
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self._requested = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports = dict(self._requested)
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else None
        self._log_file = Path(log_file) if log_file else None
        self.exit_timeout_s = exit_timeout_s
        self.cpu_threads = cpu_threads
        self.log_verbose = log_verbose
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.gpu_metrics = gpu_metrics
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._install: TritonInstall | None = None
        self._shm_prefix = f"stepaudio2_{os.getpid()}_{next(_instances)}_"

    # -- addresses ------------------------------------------------------------------------
    @property
    def urls(self) -> TritonUrls:
        h = self.host
        return TritonUrls(http=f"{h}:{self.ports['http']}", grpc=f"{h}:{self.ports['grpc']}",
                          metrics=f"http://{h}:{self.ports['metrics']}/metrics")

    @property
    def log_file(self) -> Path:
        if self._log_file is None:
            raise TritonError("the server has not been started")
        return self._log_file

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        """The exact tritonserver command line (ports as currently chosen)."""
        inst = self._install or find_triton()
        p = self.ports
        work = self.work_dir if self.work_dir is not None else Path("<work_dir>")   # made by start()
        cmd = [str(inst.binary),
               f"--model-repository={self.model_repository}",
               f"--backend-directory={work / 'backends'}",
               f"--http-address={self.host}", f"--http-port={p['http']}",
               f"--grpc-address={self.host}", f"--grpc-port={p['grpc']}",
               "--allow-metrics=true", f"--allow-gpu-metrics={str(self.gpu_metrics).lower()}",
               f"--metrics-address={self.host}", f"--metrics-port={p['metrics']}",
               f"--exit-timeout-secs={self.exit_timeout_s}",
               f"--model-control-mode={self.model_control_mode}",
               f"--log-verbose={self.log_verbose}",
               # Unique shared-memory names, so servers started side by side never collide.
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + self.extra_args

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.model_repository.is_dir():
            raise TritonError(f"model repository {self.model_repository} does not exist")
        self._install = find_triton()
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="stepaudio2-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        make_backend_dir(self._install, self.work_dir / "backends")
        if self._log_file is None:
            self._log_file = self.work_dir / "tritonserver.log"
        self._spawn()
        return self

    def _spawn(self) -> None:
        taken = {v for v in self._requested.values() if v}
        for k, v in self._requested.items():
            port = v
            while not port or (not v and port in taken):
                port = free_port(self.host)
            taken.add(port)
            self.ports[k] = port
        env = triton_environment(self._install, self.cpu_threads)
        env.update(self.extra_env)
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_file, "ab") as log:
            log.write(f"\n=== {' '.join(self.command())}\n".encode())
            log.flush()
            # Own process group: Ctrl-C in a terminal reaches us, not Triton, and stop()
            # can take down the Python stubs with it if SIGKILL is needed.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.work_dir,
                                         start_new_session=True)

    def is_ready(self, timeout: float = 1.0) -> bool:
        """Models loaded (``/v2/health/ready`` is 200) and ``/metrics`` answering: Triton
        starts its metrics service a moment after the HTTP service reports ready."""
        return _get_ok(f"{self.urls.http_base}/v2/health/ready", timeout) and _get_ok(self.urls.metrics, timeout)

    def wait_ready(self, timeout: float = 180.0, poll_s: float = 0.1) -> "TritonServer":
        """Block until ``/v2/health/ready`` is 200 (every model loaded). Raises
        :class:`TritonError` with the log's tail if the process exits or time runs out."""
        if self.proc is None:
            raise TritonError("start() the server first")
        deadline = time.monotonic() + timeout
        retried = False
        while True:
            if self.is_ready():
                return self
            rc = self.proc.poll()
            if rc is not None:
                tail = self.log_tail()
                port_clash = "already in use" in tail.lower() or "failed to listen" in tail.lower()
                if port_clash and not retried and not all(self._requested.values()):
                    retried = True  # a picked port was taken meanwhile: pick again, once
                    self._spawn()
                    continue
                raise TritonError(f"tritonserver exited with code {rc} before it was ready; "
                                  f"log {self._log_file}:\n{tail}")
            if time.monotonic() > deadline:
                raise TritonError(f"tritonserver was not ready after {timeout:.0f} s; log {self._log_file}:\n"
                                  f"{self.log_tail()}")
            time.sleep(poll_s)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TritonError):
            return "(no log)"

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, wait ``exit_timeout_s + grace_s``, then SIGKILL. Returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        grace = 10.0 if grace_s is None else grace_s
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(self.exit_timeout_s + grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            _kill_group(proc.pid)  # our own session: the server and its stubs
            proc.wait(10)
        self._reap_stubs(proc.pid, grace)
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir / "backends", ignore_errors=True)
        return proc.returncode

    def _reap_stubs(self, pgid: int, grace: float) -> None:
        """Python stubs live in the server's process group (its own session). A stub that
        hangs in shutdown outlives the server, orphaned; give them ``grace`` seconds, then
        SIGKILL what is left of the group and remove its shared-memory regions (named
        with this server's unique prefix)."""
        deadline = time.monotonic() + grace
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                _kill_group(pgid)
                time.sleep(0.2)
                break
            time.sleep(0.1)
        shm = Path("/dev/shm")
        if shm.is_dir() and not _group_alive(pgid):
            for region in shm.glob(self._shm_prefix + "*"):
                region.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TritonServer(repo={self.model_repository}, urls={self.urls}, pid={self.pid})"


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``. A stub whose
    server died is a zombie until init reaps it: that one no longer counts."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count there)
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):   # state, ppid, pgrp, ...
            return True
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _get_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ngc_docker_command(model_repository: str | Path, *, image: str = NGC_IMAGE, http_port: int = 8000,
                       grpc_port: int = 8001, metrics_port: int = 8002, model_dir: str | Path | None = None,
                       exit_timeout_s: int = 30) -> list[str]:
    """``docker run`` of NVIDIA's Triton image serving our repository on a GPU node.

    ``image`` must be NVIDIA's image, or one built from it, whose Python has the
    ``stepaudio2`` package installed (the models' ``model.py`` import it); the repository
    must be built with ``--device gpu``, and the checkpoint path it names must exist
    inside the container (``model_dir`` is mounted at the same path).
    """
    repo = Path(model_repository).resolve()
    cmd = ["docker", "run", "--rm", "--gpus", "all", "--shm-size=1g",
           "-p", f"{http_port}:{http_port}", "-p", f"{grpc_port}:{grpc_port}", "-p", f"{metrics_port}:{metrics_port}",
           "-v", f"{repo}:{repo}:ro"]
    if model_dir is not None:
        md = Path(model_dir).resolve()
        cmd += ["-v", f"{md}:{md}:ro"]
    return cmd + [image, "tritonserver", f"--model-repository={repo}", f"--http-port={http_port}",
                  f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}", f"--exit-timeout-secs={exit_timeout_s}"]
