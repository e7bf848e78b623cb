"""token2wav speed on CPU: streaming RTF / first-chunk latency and offline RTF, ours vs a baseline.

    python bench/token2wav.py [--threads 2] [--presets tiny,real] [--baseline-ref 89827e0]

Both implementations run in the same process, interleaved pass by pass, so their ratio is
measured under the same machine load (absolute numbers on a shared machine drift):
  * ours: the working tree's ``stepaudio2.model.token2wav``;
  * baseline: the same package at git ``--baseline-ref`` (default: the commit before the
    performance work), read with ``git show`` (read-only) into .cache/bench/ and imported
    under another name; ``--baseline-ref none`` skips it.

Presets:
  * tiny: ``make_tiny_token2wav`` dims; streaming at 1, 4 and 8 concurrent streams through
    ``Token2Wav.push_batch`` (one batched estimator call per Euler step for all streams;
    one ``push_batch`` call per round), 10-token prompts, 4 chunks of 25 tokens per stream;
    offline on 125 tokens with a 75-token prompt.
  * real: the released dims (spec 3.2/3.4: flow 155.8 M parameters, HiFT 20.8 M), random
    weights written once under .cache/bench/token2wav-real; 1 stream, 75-token prompt (3 s,
    150 mel frames), 3 chunks (28 tokens keeping 3, the last one 25 tokens with last=True,
    3.0 s of audio); offline 125 tokens with the 75-token prompt (5.0 s of audio).

Method (the anchor's, shared/design/token2wav_cpu_anchor.md): streaming 1 warm-up pass
then ``--passes`` timed passes, each starting with a fresh ``stream()`` (setup timed
separately); offline 1 warm-up then ``--reps`` timed runs; medians. Streaming RTF = sum of the
chunk pushes / seconds of audio returned (setup excluded); first chunk = the first push
(flow + vocoder) after setup. With several streams, RTF is wall time per round-robin pass /
one stream's audio (each stream's own real-time factor) and first chunk is the first
``push_batch`` round. The "anchor" column is copied from that document (the reference code on
this CPU model, idle machine, 10 streaming chunks); it was NOT measured by this run.
Prints tables and writes bench/results/token2wav.json.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, ROOT, machine, print_table, write_results  # noqa: E402

DEFAULT_BASELINE = "89827e0443d93150e9f58cb80acb1364dc5d80b0"   # before the token2wav CPU work
OWN = ["api", "dit", "encoder", "flow", "hift"]                    # the modules the work changed
SR = 24000

# shared/design/token2wav_cpu_anchor.md, 2 threads (reference code; NOT measured here)
ANCHOR = {"stream_rtf": "3.38 / 3.57", "first_chunk_s": "3.30 / 3.35", "setup_s": "5.29 / 5.58",
          "chunk_s": "3.39 (median, chunks 1-8)", "offline_rtf": "2.97", "offline_s": "14.83"}


def baseline_package(ref: str) -> str:
    """Write the token2wav modules at ``ref`` under .cache/bench and return the package name."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    name = f"t2w_base_{sha[:10]}"
    root = CACHE / "token2wav-baseline"
    pkg = root / name
    if not (pkg / "api.py").exists():
        pkg.mkdir(parents=True, exist_ok=True)
        for m in OWN:
            src = subprocess.run(["git", "show", f"{sha}:services/model/token2wav/{m}.py"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            for o in OWN:
                src = src.replace(f"stepaudio2.model.token2wav.{o} ", f"{name}.{o} ")
                src = src.replace(f"stepaudio2.model.token2wav.{o}\n", f"{name}.{o}\n")
            (pkg / f"{m}.py").write_text(src)
        (pkg / "__init__.py").write_text("")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return name


def real_folder() -> Path:
    from stepaudio2.model.token2wav.config import FlowConfig
    from stepaudio2.model.token2wav.tiny import TinyToken2WavDims, make_tiny_token2wav

    d = CACHE / "token2wav-real"
    if not (d / "hift.pt").exists():
        make_tiny_token2wav(d, seed=0, flow_cfg=FlowConfig(), dims=TinyToken2WavDims(hift_base=512, f0_channels=512))
    return d


def tiny_folder() -> Path:
    from stepaudio2.model.token2wav.tiny import make_tiny_token2wav

    d = CACHE / "token2wav-tiny"
    if not (d / "hift.pt").exists():
        make_tiny_token2wav(d, seed=0)
    return d


def voice(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6561, (n,), generator=g), torch.randn(2 * n, 80, generator=g), torch.randn(192, generator=g)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunks_of(toks: list[int]) -> list[tuple[list[int], bool]]:
    """The reference caller: 28 tokens per push keeping 3, the remainder with last=True."""
    out, buf = [], list(toks)
    while len(buf) >= 28:
        out.append((buf[:28], False))
        buf = buf[25:]
    out.append((buf, True))
    return out


def stream_pass(t2w, n_streams: int, n_prompt: int, n_tokens: int) -> dict:
    voices = [voice(10 + i, n_prompt) for i in range(n_streams)]
    plan = chunks_of(tokens(20, n_tokens))
    t0 = time.perf_counter()
    streams = [t2w.stream(*v, deterministic=True) for v in voices]
    setup = time.perf_counter() - t0
    chunk_times, samples = [], 0
    for toks, last in plan:
        t0 = time.perf_counter()
        if n_streams == 1:
            outs = [streams[0].push(toks, last=last)]
        else:
            outs = t2w.push_batch(streams, [toks] * n_streams, [last] * n_streams)
        chunk_times.append(time.perf_counter() - t0)
        samples += outs[0].numel()
    audio = samples / SR
    return {"setup_s": setup, "first_chunk_s": chunk_times[0], "chunk_s": chunk_times, "audio_s": audio,
            "rtf": sum(chunk_times) / audio}


def offline_run(t2w, n_prompt: int, n_tokens: int) -> dict:
    pt, pm, spk = voice(30, n_prompt)
    toks = tokens(31, n_tokens)
    t0 = time.perf_counter()
    mel = t2w.flow_offline(toks, pt, pm, spk)
    t1 = time.perf_counter()
    wav = t2w.vocode(mel, deterministic=True)
    t2 = time.perf_counter()
    audio = wav.numel() / SR
    return {"flow_s": t1 - t0, "hift_s": t2 - t1, "total_s": t2 - t0, "audio_s": audio, "rtf": (t2 - t0) / audio}


def med(xs):
    return statistics.median(xs)


def summarize_stream(passes: list[dict]) -> dict:
    # on a shared machine stalls only ever add time: the best pass / per-chunk minimum is
    # reported next to the median
    by_chunk = [min(p["chunk_s"][i] for p in passes) for i in range(len(passes[0]["chunk_s"]))]
    return {"rtf": med([p["rtf"] for p in passes]), "rtf_best": min(p["rtf"] for p in passes),
            "rtf_min_per_chunk": sum(by_chunk) / passes[0]["audio_s"], "first_chunk_s_min": by_chunk[0],
            "chunk_s_min_by_index": by_chunk, "first_chunk_s": med([p["first_chunk_s"] for p in passes]),
            "setup_s": med([p["setup_s"] for p in passes]),
            "chunk_s_median": med([c for p in passes for c in p["chunk_s"]]), "audio_s": passes[0]["audio_s"],
            "passes": passes}


def summarize_offline(runs: list[dict]) -> dict:
    return {k: med([r[k] for r in runs]) for k in ("rtf", "total_s", "flow_s", "hift_s")} | {
        "rtf_best": min(r["rtf"] for r in runs), "flow_s_min": min(r["flow_s"] for r in runs),
        "hift_s_min": min(r["hift_s"] for r in runs), "audio_s": runs[0]["audio_s"], "runs": runs}


def bench_preset(preset: str, impls: dict, args) -> dict:
    if preset == "tiny":
        folder, concurrency, n_prompt, n_tokens = tiny_folder(), [1, 4, 8], 10, 25 * 4
    else:
        folder, concurrency, n_prompt, n_tokens = real_folder(), [1], 75, 25 * args.real_chunks
    models = {name: mod.Token2Wav.from_pretrained(folder) for name, mod in impls.items()}
    out = {"folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name, "streaming": {}, "offline": {}}
    for n in concurrency if "stream" in args.modes else []:
        runs = {name: [] for name in models}
        for name, m in models.items():                   # warm-up pass
            stream_pass(m, n, n_prompt, n_tokens)
        for _ in range(args.passes):                     # interleaved timed passes
            for name, m in models.items():
                runs[name].append(stream_pass(m, n, n_prompt, n_tokens))
        out["streaming"][n] = {name: summarize_stream(r) for name, r in runs.items()}
        print(f"[{preset}] streams={n}: " + ", ".join(f"{k} RTF {v['rtf']:.3g}" for k, v in
                                                     out["streaming"][n].items()), file=sys.stderr, flush=True)
        out["streaming"][n]["path"] = "push_batch" if n > 1 else "push"
    if "offline" not in args.modes:
        return out
    runs = {name: [] for name in models}
    for name, m in models.items():
        offline_run(m, 75, 125)
    for _ in range(args.reps):
        for name, m in models.items():
            runs[name].append(offline_run(m, 75, 125))
    out["offline"] = {name: summarize_offline(r) for name, r in runs.items()}
    print(f"[{preset}] offline: " + ", ".join(f"{k} RTF {v['rtf']:.3g}" for k, v in out["offline"].items()),
          file=sys.stderr, flush=True)
    return out


def report(results: dict, names: list[str], threads: int) -> None:
    cols = ["case", "metric"] + [f"{n}" for n in names] + (["ours/base"] if len(names) == 2 else []) + [
        "anchor doc*"]
    rows = []
    for preset, r in results["presets"].items():
        for n, s in r["streaming"].items():
            label = f"{preset} x{n} {s['path']}"
            for key, title, anchor in (("rtf", "stream RTF", "stream_rtf"), ("first_chunk_s", "first chunk s",
                                                                            "first_chunk_s"),
                                       ("chunk_s_median", "chunk s (med)", "chunk_s"),
                                       ("rtf_best", "stream RTF best pass", "stream_rtf"),
                                       ("rtf_min_per_chunk", "stream RTF min/chunk", "stream_rtf"),
                                       ("first_chunk_s_min", "first chunk s min", "first_chunk_s"),
                                       ("setup_s", "setup s", "setup_s")):
                vals = [s[nm][key] for nm in names]
                rows.append([label, title, *vals, *([vals[1] / vals[0]] if len(vals) == 2 else []),
                             ANCHOR[anchor] if preset == "real" and int(n) == 1 else "-"])
        o = r["offline"]
        for key, title, anchor in (("rtf", "offline RTF", "offline_rtf"), ("total_s", "offline s", "offline_s"),
                                   ("flow_s", "offline flow s", None), ("hift_s", "offline HiFT s", None),
                                   ("rtf_best", "offline RTF best", "offline_rtf"), ("flow_s_min", "flow s min", None),
                                   ("hift_s_min", "HiFT s min", None)):
            if not o:
                break
            vals = [o[nm][key] for nm in names]
            rows.append([f"{preset} offline", title, *vals, *([vals[1] / vals[0]] if len(vals) == 2 else []),
                         ANCHOR[anchor] if preset == "real" and anchor else "-"])
    print_table(f"token2wav CPU speed ({threads} threads; ours vs baseline interleaved in one run; "
                f"anchor column copied from token2wav_cpu_anchor.md)", cols, rows)
    print("* anchor doc: shared/design/token2wav_cpu_anchor.md (reference code, idle machine, 10 streaming "
          "chunks, 'pass 1 / pass 2'); copied, NOT measured by this run")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the anchor's figure: 2)")
    ap.add_argument("--presets", default="tiny,real")
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git ref of the baseline, or 'none'")
    ap.add_argument("--passes", type=int, default=2, help="timed streaming passes (after 1 warm-up)")
    ap.add_argument("--reps", type=int, default=3, help="timed offline runs (after 1 warm-up)")
    ap.add_argument("--real-chunks", type=int, default=3, help="streaming chunks of 25 tokens at real size")
    ap.add_argument("--modes", default="stream,offline")
    ap.add_argument("--out", default="token2wav", help="results name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    impls = {"ours": importlib.import_module("stepaudio2.model.token2wav.api")}
    if args.baseline_ref != "none":
        impls = {"baseline": importlib.import_module(baseline_package(args.baseline_ref) + ".api"), **impls}
    results = {"machine": machine(), "baseline_ref": args.baseline_ref, "threads": args.threads,
               "method": {"passes": args.passes, "reps": args.reps, "real_chunks": args.real_chunks},
               "anchor_reference_doc_not_measured_here": ANCHOR, "presets": {}}
    for preset in args.presets.split(","):
        results["presets"][preset] = bench_preset(preset, impls, args)
        write_results(args.out, results)                 # partial results after each preset
    report(results, list(impls), args.threads)
    print(f"wrote {write_results(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
