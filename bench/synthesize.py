"""Served text to speech on CPU: the Triton ``token2wav`` model with sequence batching vs
without, and ``Synthesize`` end to end, at 1 / 4 / 8 concurrent streams.

    python bench/synthesize.py [--streams 1,4,8] [--chunks 6] [--reps 3]

Two tritonservers over the tiny checkpoint run side by side, the runs alternate between
them rep by rep (shared machine: only ratios from one run mean anything):
  * batched:   token2wav with ``--t2w-max-batch 8`` (chunks of different streams that
               arrive together run as ONE push_batch: one estimator call per Euler step);
  * unbatched: ``--t2w-max-batch 1`` (one chunk per execute).
Each stream sends ``--chunks`` chunks by the reference protocol (28 codes, the last 3
re-sent; the final one with END) from its own thread and client, back to back.
Reported per level: median first-chunk latency (request sent -> audio back), median
per-stream RTF (stream wall time / its audio), aggregate audio seconds per wall second,
and Triton's average executed batch (inference_count / execution_count).

Then ``Synthesize`` over gRPC through the orchestrator (LocalStack on the batched server):
time to first audio and per-request RTF at the same concurrency, with the LLM driven to
emit exactly ``--chunks * 25`` speech codes (allowed_token_ids = code ids, min_tokens).
``--real`` / ``--real-only``: also / only the Triton token2wav model at the released dims
(random weights, built-in voices warmed at start-up), 1 and 2 streams ->
bench/results/synthesize_real.json with ``--real-only``.
Prints tables and writes bench/results/synthesize.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

import numpy as np  # noqa: E402
from common import CACHE, machine, print_table, write_results  # noqa: E402

SR = 24_000


def tiny_ckpt() -> Path:
    from stepaudio2.model.tiny import make_tiny_checkpoint

    d = CACHE / "tiny-tts" / "step-audio-2-tiny"
    if not (d / "config.json").exists():
        make_tiny_checkpoint(d, seed=0)
    return d


def run_stream(url: str, sid: int, codes: list[int], voice: str, start_barrier: threading.Barrier) -> dict:
    import tritonclient.grpc as g

    def req(client, tokens, **kw):
        t = g.InferInput("TOKENS", [1, len(tokens)], "INT32")
        t.set_data_from_numpy(np.asarray([tokens], dtype=np.int32))
        inputs = [t]
        if kw.get("voice"):
            v = g.InferInput("VOICE", [1, 1], "BYTES")
            v.set_data_from_numpy(np.array([[kw["voice"].encode()]], dtype=np.object_))
            inputs.append(v)
        r = client.infer("token2wav", inputs, sequence_id=sid, sequence_start=kw.get("start", False),
                         sequence_end=kw.get("end", False))
        return r.as_numpy("AUDIO").size

    from stepaudio2.orchestrator.tts import SpeechChunker   # the orchestrator's 25 + 3 protocol

    chunker = SpeechChunker()
    chunks, rest = chunker.feed(codes), chunker.finish()
    with g.InferenceServerClient(url) as client:
        start_barrier.wait()
        t0 = time.perf_counter()
        samples = req(client, chunks[0], start=True, voice=voice)
        first = time.perf_counter() - t0
        for c in chunks[1:]:
            samples += req(client, c)
        samples += req(client, rest, end=True)
        wall = time.perf_counter() - t0
    return {"first_s": first, "wall_s": wall, "audio_s": samples / SR}


def t2w_level(url: str, n: int, chunks: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    barrier = threading.Barrier(n)
    results: list[dict] = [None] * n
    errors: list[BaseException] = []

    def work(i):
        try:
            codes = rng.randint(0, 6561, chunks * 25 + 3).tolist()
            results[i] = run_stream(url, 1000 * seed + i + 1, codes, ("default_female", "default_male")[i % 2],
                                    barrier)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"first_s": statistics.median(r["first_s"] for r in results),
            "rtf": statistics.median(r["wall_s"] / r["audio_s"] for r in results),
            "audio_per_s": sum(r["audio_s"] for r in results) / wall}


def stats(url: str) -> tuple[int, int]:
    import tritonclient.grpc as g

    with g.InferenceServerClient(url) as c:
        s = c.get_inference_statistics("token2wav", as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def synth_level(address: str, key: str, special, n: int, codes: int, seed: int) -> dict:
    import grpc

    from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    allowed = list(range(special.audio_code_base, special.audio_code_base + 6561)) + [special.eot]
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def work(i):
        try:
            with grpc.insecure_channel(address) as ch:
                stub = assistant_pb2_grpc.AssistantStub(ch)
                req = assistant_pb2.SynthesizeRequest(
                    text="Benchmark sentence number %d." % i, voice=("default_female", "default_male")[i % 2],
                    encoding=common_pb2.AUDIO_ENCODING_PCM16,
                    sampling=common_pb2.SamplingOptions(temperature=1.0, seed=seed * 100 + i, min_tokens=codes,
                                                        max_tokens=codes, allowed_token_ids=allowed))
                barrier.wait()
                t0 = time.perf_counter()
                first, nbytes = None, 0
                for ev in stub.Synthesize(req, metadata=(("authorization", f"Bearer {key}"),), timeout=600):
                    if ev.audio.data and first is None:
                        first = time.perf_counter() - t0
                    nbytes += len(ev.audio.data)
                wall = time.perf_counter() - t0
                results[i] = {"first_s": first, "wall_s": wall, "audio_s": nbytes / 2 / SR}
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"first_audio_s": statistics.median(r["first_s"] for r in results),
            "rtf": statistics.median(r["wall_s"] / r["audio_s"] for r in results)}


def real_size_model_dir(work: Path) -> Path:
    """The tiny LLM checkpoint with token2wav/ at the released dims (random weights; the
    folder bench/token2wav.py writes under .cache/bench/token2wav-real)."""
    import shutil

    from token2wav import real_folder

    d = work / "real-t2w"
    shutil.copytree(tiny_ckpt(), d, ignore=shutil.ignore_patterns("token2wav"))
    (d / "token2wav").symlink_to(real_folder().resolve())
    return d


def real_size(args, out: dict) -> None:
    """Triton token2wav at the released dims: first chunk and RTF for 1 and 2 streams. The
    built-in voices' prompt pass ran at start-up (warm), so a first chunk is one chunk."""
    from conftest import start_triton

    work = Path(tempfile.mkdtemp(prefix="bench-synth-real-"))
    ckpt = real_size_model_dir(work)
    t0 = time.perf_counter()
    with start_triton(ckpt, work / "t", models=["token2wav"], voices_dir=str(work / "voices"),
                      num_threads=args.real_threads, t2w_max_batch=2, ready_timeout=900) as srv:
        out["real"] = {"startup_s_incl_prompt_pass_of_2_voices": time.perf_counter() - t0}
        rows = []
        for n in (1, 2):
            runs = [t2w_level(srv.urls.grpc, n, args.real_chunks, seed=50 + rep) for rep in range(args.reps)]
            rec = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            out["real"][str(n)] = rec
            rows.append([f"{n} stream(s)", f"{rec['first_s']:.2f}", f"{rec['rtf']:.2f}", f"{rec['audio_per_s']:.2f}"])
        print_table(f"Triton token2wav at released dims ({args.real_threads} torch threads, {args.real_chunks} chunks)",
                    ["level", "first chunk s", "per-stream RTF", "audio s / s"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--chunks", type=int, default=6, help="25-code chunks per stream (1 s of audio each)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads per Triton model instance")
    ap.add_argument("--real", action="store_true", help="also Triton token2wav at the released dims (slow)")
    ap.add_argument("--real-only", action="store_true", help="only the released-dims part")
    ap.add_argument("--real-chunks", type=int, default=4)
    ap.add_argument("--real-threads", type=int, default=2)
    args = ap.parse_args()
    if args.real_only:
        out = {"machine": machine(), "method": vars(args)}
        real_size(args, out)
        path = write_results("synthesize_real", out)
        print(f"wrote {path.name}")
        return 0
    levels = [int(x) for x in args.streams.split(",")]

    from conftest import start_triton

    from stepaudio2.model.tokenizer import StepAudioTokenizer
    from stepaudio2.stack import LocalStack

    ckpt = tiny_ckpt()
    special = StepAudioTokenizer.from_dir(ckpt).special
    work = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    voices = work / "voices"
    out: dict = {"machine": machine(), "method": vars(args), "token2wav": {}, "synthesize": {}}
    with start_triton(ckpt, work / "a", voices_dir=str(voices), num_threads=args.num_threads, t2w_max_batch=8,
                      t2w_queue_delay_us=2000) as batched, \
            start_triton(ckpt, work / "b", models=["token2wav"], voices_dir=str(voices),
                         num_threads=args.num_threads, t2w_max_batch=1) as unbatched:
        servers = {"batched": batched, "unbatched": unbatched}
        for name, srv in servers.items():      # warm-up
            t2w_level(srv.urls.grpc, 2, 2, seed=999)
        samples: dict = {(name, n): [] for name in servers for n in levels}
        batch: dict = {}
        for rep in range(args.reps):
            for n in levels:
                for name, srv in servers.items():
                    before = stats(srv.urls.grpc)
                    samples[(name, n)].append(t2w_level(srv.urls.grpc, n, args.chunks, seed=rep * 10 + n))
                    after = stats(srv.urls.grpc)
                    batch.setdefault((name, n), []).append((after[0] - before[0]) / max(1, after[1] - before[1]))
        rows = []
        for n in levels:
            for name in servers:
                s = samples[(name, n)]
                rec = {k: statistics.median(x[k] for x in s) for k in s[0]}
                rec["avg_batch"] = statistics.median(batch[(name, n)])
                out["token2wav"].setdefault(str(n), {})[name] = rec
                rows.append([f"{n} streams, {name}", f"{rec['first_s'] * 1000:.0f}", f"{rec['rtf']:.3f}",
                             f"{rec['audio_per_s']:.1f}", f"{rec['avg_batch']:.2f}"])
            b, u = out["token2wav"][str(n)]["batched"], out["token2wav"][str(n)]["unbatched"]
            out["token2wav"][str(n)]["throughput_ratio"] = b["audio_per_s"] / u["audio_per_s"]
        print_table("Triton token2wav (tiny): sequence batching vs one chunk per execute",
                    ["level", "first chunk ms", "per-stream RTF", "audio s / s", "avg batch"], rows)
        print("throughput batched / unbatched: " + ", ".join(
            f"{n} streams {out['token2wav'][str(n)]['throughput_ratio']:.2f}x" for n in levels))

        with LocalStack(ckpt, triton_server=batched, voices_dir=voices) as stack:
            synth_level(stack.grpc_address, stack.api_key, special, 1, 25, seed=999)      # warm-up
            rows = []
            for n in levels:
                s = [synth_level(stack.grpc_address, stack.api_key, special, n, args.chunks * 25, seed=rep)
                     for rep in range(args.reps)]
                rec = {k: statistics.median(x[k] for x in s) for k in s[0]}
                out["synthesize"][str(n)] = rec
                rows.append([f"{n} requests", f"{rec['first_audio_s'] * 1000:.0f}", f"{rec['rtf']:.3f}"])
            print_table(f"Synthesize over gRPC (tiny, {args.chunks * 25} speech codes = {args.chunks} s each)",
                        ["level", "time to first audio ms", "per-request RTF"], rows)
    if args.real:
        real_size(args, out)
    path = write_results("synthesize", out)
    print(f"wrote {path.relative_to(Path(__file__).resolve().parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
