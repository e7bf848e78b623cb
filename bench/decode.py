"""Decode speed: KV-cache decode vs the reference's full recompute per token, and batch scaling.

    python bench/decode.py [--threads 1] [--steps 16]

For a tiny and a mid-size (8 layers x 512) random checkpoint:
  * per-token time of KV-cache decode at contexts 128 / 512 / 2048, and of a
    full-recompute loop (the official HF script re-runs the whole sequence per token,
    spec §6.1) at the same contexts, measured side by side in one run;
  * decode step time at batch 1 / 4 / 8 / 16 (context 128).
Goal (issue 2): KV-cache per-token time at 2048 <= 1.5x that at 128.
Prints a table and writes bench/results/decode.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import checkpoint, machine, print_table, write_results  # noqa: E402

from stepaudio2.model import StepAudio2  # noqa: E402

CONTEXTS = [128, 512, 2048]
BATCHES = [1, 4, 8, 16]


def prompt(model, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    hi = model.tokenizer.special.endoftext  # plain BPE text ids only
    return torch.randint(0, hi, (n,), generator=g).tolist()


@torch.inference_mode()
def kv_decode_per_token(model, ctx: int, steps: int, batch: int = 1) -> float:
    cache = model.new_cache(batch, capacity=ctx + steps + 8)
    slots = [cache.allocate() for _ in range(batch)]
    logits = model.prefill(cache, slots, [prompt(model, ctx, s) for s in range(batch)])
    toks = logits.argmax(-1).tolist()
    for _ in range(2):  # warm-up steps
        toks = model.decode(cache, slots, toks).argmax(-1).tolist()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        toks = model.decode(cache, slots, toks).argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def full_recompute_per_token(model, ctx: int, reps: int) -> float:
    ids = prompt(model, ctx, 0)
    model.logits(ids[: min(ctx, 64)])  # warm-up
    times = []
    for k in range(reps):
        t0 = time.perf_counter()
        nxt = int(model.logits(ids)[-1].argmax())
        times.append(time.perf_counter() - t0)
        ids = ids + [nxt]
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the issue's reference figure: 1)")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per point")
    ap.add_argument("--recompute-reps", type=int, default=3)
    ap.add_argument("--presets", default="tiny,mid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "checkpoints": {}}
    rows_ctx, rows_batch = [], []
    for preset in args.presets.split(","):
        model = StepAudio2.from_pretrained(checkpoint(f"decode-{preset}", preset))
        t = model.config.text
        label = f"{preset} ({t.num_hidden_layers}L x {t.hidden_size})"
        entry = {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "context": {}, "batch": {}}
        for ctx in CONTEXTS:
            kv = kv_decode_per_token(model, ctx, args.steps)
            full = full_recompute_per_token(model, ctx, args.recompute_reps)
            entry["context"][ctx] = {"kv_ms_per_token": kv * 1e3, "kv_tokens_per_s": 1 / kv,
                                     "recompute_ms_per_token": full * 1e3, "recompute_tokens_per_s": 1 / full,
                                     "speedup": full / kv}
            rows_ctx.append([label, ctx, kv * 1e3, 1 / kv, full * 1e3, 1 / full, full / kv])
        c = entry["context"]
        entry["kv_growth_2048_vs_128"] = c[2048]["kv_ms_per_token"] / c[128]["kv_ms_per_token"]
        entry["recompute_growth_2048_vs_128"] = c[2048]["recompute_ms_per_token"] / c[128]["recompute_ms_per_token"]
        for b in BATCHES:
            step = kv_decode_per_token(model, 128, args.steps, batch=b)
            entry["batch"][b] = {"step_ms": step * 1e3, "tokens_per_s": b / step}
            rows_batch.append([label, b, step * 1e3, b / step])
        results["checkpoints"][preset] = entry
    print_table(f"Per-token decode time vs context ({args.threads} thread(s))",
                ["checkpoint", "context", "KV ms/tok", "KV tok/s", "recompute ms/tok", "recompute tok/s", "speedup"],
                rows_ctx)
    print_table("Decode step vs batch size (context 128)", ["checkpoint", "batch", "step ms", "tokens/s"], rows_batch)
    growth = [[p, e["kv_growth_2048_vs_128"], e["recompute_growth_2048_vs_128"]]
              for p, e in results["checkpoints"].items()]
    print_table("Growth of per-token time, context 2048 vs 128 (goal for KV: <= 1.5x)",
                ["checkpoint", "KV cache", "full recompute"], growth)
    print(f"wrote {write_results('decode', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
