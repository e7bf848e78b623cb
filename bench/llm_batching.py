"""Continuous batching: aggregate tokens/s at 1/4/8/16 concurrent streams vs a
sequential loop over the same model, in the same run.

    python bench/llm_batching.py [--tokens 64] [--skip-triton]

Two levels:
  * engine: the scheduler (stepaudio2.model.engine.LLMEngine) driven in-process;
  * triton: the `llm` model of a real tritonserver (started here on free ports, tiny
    checkpoint), streamed over gRPC by a load client running in ITS OWN process; a
    response may carry several tokens when they queue up.
For each: tokens/s with N concurrent streams, tokens/s of N requests one after the
other (sequential), their ratio, and p50/p95 time to first token.
Goal (issue 3): >= 4x at 8 streams through Triton on the 2-core machine, tiny model.
Prints a table and writes bench/results/llm_batching.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint, machine, print_table, write_results  # noqa: E402

STREAMS = [1, 4, 8, 16]


def prompts(tokenizer, n: int) -> list[list[int]]:
    base = "<|BOT|>system\nYou are a helpful assistant.<|EOT|><|BOT|>human\n{}<|EOT|><|BOT|>assistant\n"
    return [tokenizer.encode(base.format(f"tell me a story number {i}")) for i in range(n)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# -- engine level ------------------------------------------------------------------------
def engine_level(model_dir: Path, tokens: int) -> dict:
    import torch

    from stepaudio2.model import StepAudio2
    from stepaudio2.model.engine import LLMEngine
    from stepaudio2.model.sampling import SamplingParams

    torch.set_num_threads(1)
    model = StepAudio2.from_pretrained(model_dir)
    eng = LLMEngine(model, max_batch=16, max_queue=64).start()
    params = lambda: SamplingParams(max_new_tokens=tokens, min_tokens=tokens)  # noqa: E731
    out = {}
    try:
        eng.submit("warm", prompts(model.tokenizer, 1)[0], params=params()).result()
        for n in STREAMS:
            ps = prompts(model.tokenizer, n)
            t0 = time.perf_counter()
            for i, p in enumerate(ps):
                eng.submit(f"s{n}-{i}", p, params=params()).result()
            seq = time.perf_counter() - t0
            ttft, total = [], 0
            t0 = time.perf_counter()
            handles = [(eng.submit(f"c{n}-{i}", p, params=params()), time.perf_counter()) for i, p in enumerate(ps)]
            lock = threading.Lock()

            def drain(h, t_sub):
                nonlocal total
                first = None
                for o in h:
                    if first is None and o.token_ids:
                        first = time.perf_counter() - t_sub
                    with lock:
                        total += len(o.token_ids)
                ttft.append(first)

            ths = [threading.Thread(target=drain, args=hs) for hs in handles]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            conc = time.perf_counter() - t0
            out[n] = {"concurrent_tok_s": total / conc, "sequential_tok_s": n * tokens / seq,
                      "ratio": (total / conc) / (n * tokens / seq),
                      "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p95_ms": 1e3 * pct(ttft, 0.95),
                      "max_running": eng.stats.max_running}
    finally:
        eng.stop()
    return out


# -- through Triton: the load client runs in its own process ----------------------------------
CLIENT = r"""
import json, sys, time, threading, queue
import numpy as np
import tritonclient.grpc as grpcclient
url, tokens, streams = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(',')]
ps = json.loads(sys.stdin.read())

def make_inputs(ids):
    ins = []
    for name, arr, dt in [("INPUT_IDS", np.array(ids, np.int32), "INT32"),
                          ("MAX_TOKENS", np.array([tokens], np.int32), "INT32"),
                          ("MIN_TOKENS", np.array([tokens], np.int32), "INT32")]:
        t = grpcclient.InferInput(name, list(arr.shape), dt); t.set_data_from_numpy(arr); ins.append(t)
    return ins

def run_batch(n, concurrent):
    results = {}
    done = threading.Event()
    lock = threading.Lock()
    t_sub = {}
    def cb(result, error):
        if error is not None:
            print("error", error, file=sys.stderr); done.set(); return
        rid = result.get_response().id
        ids = result.as_numpy("TOKEN_IDS")
        final = result.get_response().parameters.get("triton_final_response")
        now = time.perf_counter()
        with lock:
            r = results.setdefault(rid, {"n": 0, "first": None, "final": False})
            if ids is not None and len(ids) and r["first"] is None:
                r["first"] = now - t_sub[rid]
            r["n"] += 0 if ids is None else len(ids)
            if final is not None and final.bool_param:
                r["final"] = True
                if sum(1 for v in results.values() if v["final"]) == n:
                    done.set()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=cb)
    t0 = time.perf_counter()
    if concurrent:
        for i in range(n):
            rid = f"{n}-{i}-{time.time_ns()}"; t_sub[rid] = time.perf_counter()
            c.async_stream_infer("llm", make_inputs(ps[i]), request_id=rid, enable_empty_final_response=True)
        done.wait(600)
    else:
        for i in range(n):
            done.clear(); target = i + 1
            rid = f"{n}-{i}-{time.time_ns()}"; t_sub[rid] = time.perf_counter()
            c.async_stream_infer("llm", make_inputs(ps[i]), request_id=rid, enable_empty_final_response=True)
            while sum(1 for v in results.values() if v["final"]) < target:
                time.sleep(0.0005)
    el = time.perf_counter() - t0
    c.stop_stream(); c.close()
    total = sum(v["n"] for v in results.values())
    return total / el, [v["first"] for v in results.values()]

out = {}
reps = int(sys.argv[4])
run_batch(1, False)  # warm-up
for n in streams:
    seqs, concs, firsts = [], [], []
    for _ in range(reps):  # interleaved, median: the machine is shared and noisy
        seqs.append(run_batch(n, False)[0])
        c, f = run_batch(n, True)
        concs.append(c)
        firsts += f
    med = lambda xs: sorted(xs)[len(xs) // 2]
    out[n] = {"sequential_tok_s": med(seqs), "concurrent_tok_s": med(concs), "ttft": firsts,
              "ratios": [c / s for c, s in zip(concs, seqs)]}
print(json.dumps(out))
"""


def triton_level(model_dir: Path, tokens: int, reps: int = 3, stream_interval_ms: float = 8.0) -> dict:
    from stepaudio2.model.tokenizer import StepAudioTokenizer
    from stepaudio2.runtime.model_repo import build_model_repo
    from stepaudio2.runtime.triton import TritonServer

    tok = StepAudioTokenizer.from_dir(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_model_repo(model_dir, Path(tmp) / "repo", device="cpu", max_batch=16, llm_max_queue=64,
                                num_threads=1, models=["llm"], stream_interval_ms=stream_interval_ms)
        with TritonServer(repo, work_dir=Path(tmp) / "triton") as server:
            r = subprocess.run([sys.executable, "-c", CLIENT, server.urls.grpc, str(tokens),
                                ",".join(map(str, STREAMS)), str(reps)], input=json.dumps(prompts(tok, max(STREAMS))),
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"load client failed: {r.stderr[-2000:]}")
            raw = json.loads(r.stdout.strip().splitlines()[-1])
    out = {}
    for n, v in raw.items():
        firsts = [f for f in v["ttft"] if f is not None]
        out[int(n)] = {"concurrent_tok_s": v["concurrent_tok_s"], "sequential_tok_s": v["sequential_tok_s"],
                       "ratio": v["concurrent_tok_s"] / v["sequential_tok_s"],
                       "ttft_p50_ms": 1e3 * pct(firsts, 0.5), "ttft_p95_ms": 1e3 * pct(firsts, 0.95),
                       "ratio_per_rep": v["ratios"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per point through Triton (median)")
    ap.add_argument("--stream-interval-ms", type=float, default=8.0, help="the llm model's stream interval")
    args = ap.parse_args()
    model_dir = checkpoint("decode-tiny", "tiny")
    results = {"machine": machine(), "tokens_per_stream": args.tokens, "engine": engine_level(model_dir, args.tokens)}
    if not args.skip_triton:
        results["triton"] = triton_level(model_dir, args.tokens, args.reps, args.stream_interval_ms)
        results["stream_interval_ms"] = args.stream_interval_ms
    rows = []
    for level in ("engine", "triton"):
        for n, v in results.get(level, {}).items():
            rows.append([level, n, v["sequential_tok_s"], v["concurrent_tok_s"], v["ratio"], v["ttft_p50_ms"],
                         v["ttft_p95_ms"]])
    print_table(f"Continuous batching, tiny checkpoint, {args.tokens} tokens per stream",
                ["level", "streams", "sequential tok/s", "concurrent tok/s", "ratio", "TTFT p50 ms", "TTFT p95 ms"],
                rows)
    print(f"wrote {write_results('llm_batching', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
