"""Integration fixtures: a REAL tritonserver (the one bundled in nvidia-pytriton) serving
our model repository built from the tiny checkpoint, on free loopback ports.

Reuse from any integration test::

    def test_something(triton):               # session-scoped, shared
        grpcclient.InferenceServerClient(triton.urls.grpc)   # "127.0.0.1:PORT"
        triton.urls.http, triton.urls.metrics, triton.model_repository

or start your own with other repository options (stopped at the end of the session,
also on failure)::

    def test_other(triton_factory):
        server = triton_factory(models=["llm"], llm_max_batch=1, llm_max_queue=1)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

# The session server's repository options (tests may rely on them).
TRITON_REPO_OPTIONS = dict(
    max_batch=8,              # audio_encoder max_batch_size
    queue_delay_us=20_000,    # long enough that concurrent encoder requests share a batch
    llm_max_batch=8,          # sequences the llm engine decodes together
    llm_max_queue=32,
    num_threads=1,            # 2-core CI machines: one torch thread per model instance
)


@contextlib.contextmanager
def start_triton(model_dir: Path, out_dir: Path, *, models=None, ready_timeout: float = 180.0, **repo_options):
    """Build a model repository in ``out_dir`` and serve it; yields the running
    :class:`~stepaudio2.runtime.triton.TritonServer` and stops it on exit."""
    from stepaudio2.runtime.model_repo import build_model_repo
    from stepaudio2.runtime.triton import TritonServer

    repo = build_model_repo(model_dir, Path(out_dir) / "model_repository", models=models, **repo_options)
    server = TritonServer(repo, work_dir=Path(out_dir) / "triton", exit_timeout_s=5)
    server.voices_dir = repo_options.get("voices_dir")     # LocalStack(triton_server=...) shares it
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop(grace_s=10)


@pytest.fixture(scope="session")
def triton(tiny_ckpt, tmp_path_factory):
    """tritonserver with every model (TRITON_REPO_OPTIONS; the voice library in a temp folder) on free ports."""
    tmp = tmp_path_factory.mktemp("triton")
    with start_triton(tiny_ckpt, tmp, voices_dir=str(tmp / "voices"), **TRITON_REPO_OPTIONS) as server:
        yield server


@pytest.fixture(scope="session")
def triton_factory(tiny_ckpt, tmp_path_factory):
    """``factory(models=None, **repo_options) -> TritonServer``: more servers over the tiny
    checkpoint with other options (``build_model_repo`` keywords); all are stopped when
    the session ends. Each one costs a few seconds of start-up: share them."""
    with contextlib.ExitStack() as stack:
        def factory(models=None, **repo_options):
            tmp = tmp_path_factory.mktemp("triton")
            return stack.enter_context(start_triton(tiny_ckpt, tmp, models=models,
                                                    **{"num_threads": 1, "voices_dir": str(tmp / "voices"),
                                                       **repo_options}))
        yield factory
