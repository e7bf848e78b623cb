"""`stepaudio2 triton` and `stepaudio2 model-repo ...` subcommands (issue 3)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def _repo_options(s: argparse.ArgumentParser) -> None:
    from stepaudio2.runtime.model_repo import DTYPES, RepoOptions

    d = RepoOptions()
    g = s.add_argument_group("model repository")
    g.add_argument("--device", choices=["cpu", "gpu"], default=d.device, help="instance kind (KIND_CPU / KIND_GPU)")
    g.add_argument("--instances", type=int, default=d.instances, help="audio_encoder instances")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="audio_encoder max_batch_size")
    g.add_argument("--queue-delay-us", type=int, default=d.queue_delay_us,
                   help="audio_encoder dynamic batching max_queue_delay_microseconds")
    g.add_argument("--llm-max-batch", type=int, default=None,
                   help="sequences the llm engine decodes together (default: --max-batch)")
    g.add_argument("--llm-max-queue", type=int, default=d.llm_max_queue,
                   help="llm requests that may wait; more are refused with RESOURCE_EXHAUSTED")
    g.add_argument("--prefill-budget", type=int, default=d.prefill_budget, help="prompt tokens prefilled per step")
    g.add_argument("--kv-capacity", type=int, default=d.kv_capacity, help="initial KV-cache length per slot")
    g.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_ms,
                   help="llm: tokens made within this window share one streamed response")
    g.add_argument("--max-len", type=int, default=None, help="context limit (default: the checkpoint's)")
    g.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
    g.add_argument("--num-threads", type=int, default=None, help="torch threads per model instance")
    g.add_argument("--t2w-max-batch", type=int, default=d.t2w_max_batch,
                   help="token2wav: chunks of different streams run together")
    g.add_argument("--t2w-max-streams", type=int, default=d.t2w_max_streams, help="token2wav: open streams at most")
    g.add_argument("--t2w-idle-timeout-s", type=float, default=d.t2w_idle_timeout_s,
                   help="token2wav: free a stream after this long without a chunk")
    g.add_argument("--voices-dir", default=None,
                   help="voice library folder (default: STEPAUDIO2_VOICES_* settings: S3 or a local folder)")
    g.add_argument("--models", default=None, help="comma-separated subset of the models (default: all)")


def _build(args, out: Path) -> Path:
    from stepaudio2.cli import _resolve_model_dir
    from stepaudio2.runtime.model_repo import build_model_repo

    model_dir = _resolve_model_dir(args.model_dir)
    return build_model_repo(
        model_dir, out, device=args.device, max_batch=args.max_batch, instances=args.instances,
        models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
        queue_delay_us=args.queue_delay_us, llm_max_batch=args.llm_max_batch, llm_max_queue=args.llm_max_queue,
        prefill_budget=args.prefill_budget, kv_capacity=args.kv_capacity, max_len=args.max_len, dtype=args.dtype,
        num_threads=args.num_threads, stream_interval_ms=args.stream_interval_ms,
        t2w_max_batch=args.t2w_max_batch, t2w_max_streams=args.t2w_max_streams,
        t2w_idle_timeout_s=args.t2w_idle_timeout_s, voices_dir=args.voices_dir)


def cmd_model_repo_build(args) -> int:
    out = _build(args, Path(args.out))
    names = sorted(p.parent.name for p in out.glob("*/config.pbtxt"))
    print(f"wrote model repository {out.resolve()} ({', '.join(names)}; {args.device})")
    return 0


def cmd_triton(args) -> int:
    from stepaudio2.runtime.settings import ModelSettings
    from stepaudio2.runtime.triton import TritonServer

    home = ModelSettings().cache_dir.resolve() / "triton"
    repo = Path(args.model_repo) if args.model_repo else _build(args, home / "model_repository")
    server = TritonServer(repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, work_dir=home / "work",
                          log_file=Path(args.log_file) if args.log_file else home / "tritonserver.log",
                          exit_timeout_s=args.exit_timeout_secs)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        u = server.urls
        print(f"tritonserver (pid {server.pid}) serving {repo}\n"
              f"  HTTP     http://{u.http}   (KServe v2; ready: /v2/health/ready)\n"
              f"  gRPC     {u.grpc}\n"
              f"  metrics  {u.metrics}\n"
              f"  log      {server.log_file}", flush=True)
        server.wait_ready(args.ready_timeout)
        print("ready (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                print(f"tritonserver exited with code {server.proc.returncode if server.proc else '?'}; log tail:\n"
                      f"{server.log_tail()}", file=sys.stderr)
                return 1
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def register(sub) -> None:
    """Add this module's subcommands to the `stepaudio2` argument parser."""
    mr = sub.add_parser("model-repo", help="build the Triton model repository")
    mr_sub = mr.add_subparsers(dest="model_repo_command", required=True)
    s = mr_sub.add_parser("build", help="fill model_repository/ templates for a checkpoint into --out")
    s.add_argument("--model-dir", default=None, help="checkpoint folder (default: STEPAUDIO2_MODEL_DIR or the demo checkpoint)")
    s.add_argument("--out", required=True, help="where to write the repository")
    _repo_options(s)
    s.set_defaults(fn=cmd_model_repo_build)

    s = sub.add_parser("triton", help="run the local tritonserver (nvidia-pytriton's) in the foreground")
    s.add_argument("--model-dir", default=None, help="checkpoint folder (default: STEPAUDIO2_MODEL_DIR or the demo checkpoint)")
    s.add_argument("--model-repo", default=None,
                   help="serve this built repository (default: build one into <cache>/triton/model_repository)")
    s.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--exit-timeout-secs", type=int, default=30, help="grace for in-flight requests on stop")
    s.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every model to load")
    s.add_argument("--log-file", default=None)
    _repo_options(s)
    s.set_defaults(fn=cmd_triton)
