"""Soak: concurrent Synthesize requests over the real stack, half of them cancelled by the
client right after their first audio, round after round; after each round the Triton
token2wav model must hold no stream (its live-streams gauge returns to 0).

    python bench/soak_synthesize.py [--rounds 50] [--concurrency 10] [--codes 80]

The bounded version runs in `make test` (tests/integration/test_synthesize.py); this is
the long one (reliability anchors: soak goals live in bench/, not in CI). Prints a table
and writes bench/results/soak_synthesize.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from common import machine, print_table, write_results  # noqa: E402
from synthesize import tiny_ckpt  # noqa: E402


def live_streams(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return float(re.search(r"^stepaudio2_token2wav_live_streams\{[^}]*\} (\S+)$", text, re.M).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--codes", type=int, default=80, help="speech codes per request")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import grpc
    from conftest import start_triton

    from stepaudio2.model.tokenizer import StepAudioTokenizer
    from stepaudio2.stack import LocalStack
    from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    ckpt = tiny_ckpt()
    sp = StepAudioTokenizer.from_dir(ckpt).special
    allowed = list(range(sp.audio_code_base, sp.audio_code_base + 6561)) + [sp.eot]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak-synth-"))
    rows, stats = [], {"complete": 0, "cancelled": 0, "wrong_length": 0, "errors": 0, "leaked_rounds": 0}
    with start_triton(ckpt, work, voices_dir=str(work / "voices"), num_threads=1) as srv, \
            LocalStack(ckpt, triton_server=srv) as stack, grpc.insecure_channel(stack.grpc_address) as ch:
        stub = assistant_pb2_grpc.AssistantStub(ch)
        md = (("authorization", f"Bearer {stack.api_key}"),)

        def one(i: int, cancel_after: int | None):
            req = assistant_pb2.SynthesizeRequest(
                text=f"Soak {i}.", voice=("default_female", "default_male")[i % 2],
                encoding=common_pb2.AUDIO_ENCODING_PCM16,
                sampling=common_pb2.SamplingOptions(temperature=1.0, seed=i, min_tokens=args.codes,
                                                    max_tokens=args.codes, allowed_token_ids=allowed))
            call = stub.Synthesize(req, metadata=md, timeout=300)
            try:
                if cancel_after is not None:
                    for _ in range(cancel_after):
                        next(call)
                    call.cancel()
                    return "cancelled"
                n = sum(len(e.audio.data) for e in call) // 2
                return "complete" if n == args.codes * 960 else "wrong_length"
            except grpc.RpcError as e:
                return "cancelled" if e.code() == grpc.StatusCode.CANCELLED else "errors"

        t0 = time.perf_counter()
        for r in range(args.rounds):
            plan = [(i + r * args.concurrency, rng.choice([None, 1, 2]) if i % 2 else None)
                    for i in range(args.concurrency)]
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                outcomes = list(pool.map(lambda p: one(*p), plan))
            for o in outcomes:
                stats[o] += 1
            deadline = time.monotonic() + 30
            live = live_streams(srv.urls.metrics)
            while live and time.monotonic() < deadline:
                time.sleep(0.2)
                live = live_streams(srv.urls.metrics)
            stats["leaked_rounds"] += live > 0
            if (r + 1) % 10 == 0 or live:
                print(f"round {r + 1}/{args.rounds}: live streams after the round {live:g}", flush=True)
        stats["seconds"] = round(time.perf_counter() - t0, 1)
    rows = [[k, str(v)] for k, v in stats.items()]
    print_table(f"Synthesize soak: {args.rounds} rounds x {args.concurrency} requests", ["what", "count"], rows)
    write_results("soak_synthesize", {"machine": machine(), "method": vars(args), "results": stats})
    return 1 if stats["leaked_rounds"] or stats["errors"] or stats["wrong_length"] else 0


if __name__ == "__main__":
    sys.exit(main())
