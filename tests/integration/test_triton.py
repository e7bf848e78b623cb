"""Our model repository on a REAL tritonserver (CPU, tiny checkpoint): the audio encoder
equals the in-process model and really batches; the streaming LLM yields exactly the
in-process greedy/seeded ids, batches concurrent streams, frees a cancelled stream's slot,
refuses a full queue and bad inputs with stable error prefixes, and keeps serving."""
from __future__ import annotations

import queue
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from stepaudio2.runtime.triton_params import error_code_of

WAIT_S = 120  # upper bound for any single wait; never a timing assertion


# -- client helpers -------------------------------------------------------------------------
def _tensor(name, arr, dtype):
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def encoder_inputs(waveform=None, mel=None):
    ins = []
    if waveform is not None:
        ins.append(_tensor("WAVEFORM", np.asarray(waveform, np.float32)[None], "FP32"))
    if mel is not None:
        ins.append(_tensor("MEL", np.asarray(mel, np.float32)[None], "FP32"))
    return ins


def encode(client, waveform=None, mel=None) -> np.ndarray:
    r = client.infer("audio_encoder", encoder_inputs(waveform, mel))
    emb = r.as_numpy("EMBEDS")[0]
    assert r.as_numpy("EMBED_LEN").reshape(-1).tolist() == [emb.shape[0]]
    return emb


_SCALARS = {"MAX_TOKENS": ("INT32", np.int32), "MIN_TOKENS": ("INT32", np.int32), "TOP_K": ("INT32", np.int32),
            "TEMPERATURE": ("FP32", np.float32), "TOP_P": ("FP32", np.float32),
            "REPETITION_PENALTY": ("FP32", np.float32), "SEED": ("INT64", np.int64)}


def llm_inputs(ids, audio_embeds=None, stop_ids=None, **scalars):
    ins = [_tensor("INPUT_IDS", np.asarray(ids, np.int32).reshape(-1), "INT32")]
    if audio_embeds is not None:
        ins.append(_tensor("AUDIO_EMBEDS", np.asarray(audio_embeds, np.float32), "FP32"))
    if stop_ids is not None:
        ins.append(_tensor("STOP_IDS", np.asarray(stop_ids, np.int32), "INT32"))
    for name, value in scalars.items():
        dt, npdt = _SCALARS[name]
        ins.append(_tensor(name, np.array([value], npdt), dt))
    return ins


class Stream:
    """One gRPC stream to the decoupled ``llm``: send requests, collect each one's ids,
    finish reason (from the response flagged final) or error message."""

    def __init__(self, url):
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))
        self.results: dict[str, dict] = {}

    def send(self, rid, **kw):
        self.results[rid] = {"ids": [], "reason": None, "error": None, "done": False, "responses": 0}
        self.client.async_stream_infer("llm", llm_inputs(**kw), request_id=rid, enable_empty_final_response=True)

    def _pump(self, timeout):
        result, error = self.events.get(timeout=timeout)
        if error is not None:
            # A stream error carries the request id only in its message: match it.
            open_ids = [r for r, v in self.results.items() if not v["done"]]
            rid = next((r for r in open_ids if f"[request id: {r}]" in error.message()), open_ids[0])
            self.results[rid].update(error=error.message(), done=True)
            return rid
        resp = result.get_response()
        res = self.results[resp.id]
        res["responses"] += 1
        ids = result.as_numpy("TOKEN_IDS")
        if ids is not None:
            res["ids"] += ids.tolist()
            reason = result.as_numpy("FINISH_REASON")[0].decode()
            if reason:
                res["reason"] = reason
        if resp.parameters["triton_final_response"].bool_param:
            res["done"] = True
        return resp.id

    def wait_first(self, rid, timeout=WAIT_S):
        while not self.results[rid]["ids"] and not self.results[rid]["done"]:
            self._pump(timeout)

    def wait(self, timeout=WAIT_S) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while not all(v["done"] for v in self.results.values()):
            self._pump(max(0.1, deadline - time.monotonic()))
        return self.results

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def llm_run(url, **kw) -> dict:
    s = Stream(url)
    try:
        s.send("r", **kw)
        return s.wait()["r"]
    finally:
        s.close()


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.urls.metrics, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(stepaudio2_\w+)\{[^}]*\} ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_metric(server, name, pred, timeout=10.0):
    """Custom metrics are published every 200 ms: poll until ``pred`` holds (or return
    the last value, for the assertion to report)."""
    deadline = time.monotonic() + timeout
    while True:
        v = metrics(server).get(name)
        if (v is not None and pred(v)) or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def clip(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def grpc(triton):
    c = grpcclient.InferenceServerClient(triton.urls.grpc)
    yield c
    c.close()


# -- audio_encoder ------------------------------------------------------------------------------
def test_server_reports_both_models(triton, grpc):
    assert grpc.is_server_ready()
    for name in ("audio_encoder", "llm"):
        assert grpc.is_model_ready(name)
    cfg = grpc.get_model_config("llm", as_json=True)["config"]
    assert cfg["model_transaction_policy"]["decoupled"] is True
    assert (triton.model_repository / "llm" / "config.pbtxt").is_file()


def test_encoder_matches_in_process(grpc, tiny_model):
    for i, n in enumerate([16000, 12345, 40000, 801, 100]):   # 100 samples: no patch at all
        wav = clip(n, i)
        want = tiny_model.encode_chunks([wav])[0].numpy()
        got = encode(grpc, waveform=wav)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        # The MEL input path gives the same embeddings.
        np.testing.assert_allclose(encode(grpc, mel=tiny_model.log_mel(wav)), want, atol=1e-5, rtol=0)


def _stats(client, model):
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def _concurrent_encode(client, requests):
    """Fire all requests at once (async_infer); results in order: array or exception."""
    done: queue.Queue = queue.Queue()
    for i, kw in enumerate(requests):
        client.async_infer("audio_encoder", encoder_inputs(**kw),
                           callback=lambda result, error, i=i: done.put((i, result, error)))
    out = [None] * len(requests)
    for _ in requests:
        i, result, error = done.get(timeout=WAIT_S)
        out[i] = error if error is not None else result.as_numpy("EMBEDS")[0]
    return out


def test_encoder_dynamic_batching_is_real_batching(grpc, tiny_model):
    wavs = [clip(24000, 10 + i) for i in range(8)]   # one length: batching adds no padding
    inf0, exe0 = _stats(grpc, "audio_encoder")
    got = _concurrent_encode(grpc, [{"waveform": w} for w in wavs])
    # Statistics are recorded after the responses went out: wait until all 8 are counted.
    deadline = time.monotonic() + 10
    while (inf1 := _stats(grpc, "audio_encoder")[0]) - inf0 < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    inf1, exe1 = _stats(grpc, "audio_encoder")
    for w, g in zip(wavs, got):
        np.testing.assert_allclose(g, tiny_model.encode_chunks([w])[0].numpy(), atol=1e-5, rtol=0)
    assert inf1 - inf0 == 8
    assert exe1 - exe0 < 8, f"8 concurrent requests took {exe1 - exe0} executions: no batching happened"


def test_encoder_bad_request_fails_alone(grpc, tiny_model):
    good = clip(16000, 3)
    bad = [
        ({"waveform": np.zeros(0, np.float32)}, "empty"),
        ({"waveform": np.full(1600, np.nan, np.float32)}, "NaN"),
        ({"waveform": np.zeros(30 * 16000 + 1, np.float32)}, "at most 30 s"),
        ({"waveform": good, "mel": tiny_model.log_mel(good)}, "exactly one"),
        ({"mel": np.zeros((128, 2), np.float32)}, "frames"),
    ]
    reqs = [{"waveform": good}] + [kw for kw, _ in bad] + [{"waveform": good}]
    out = _concurrent_encode(grpc, reqs)
    want = tiny_model.encode_chunks([good])[0].numpy()
    for g in (out[0], out[-1]):
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
    for (kw, why), err in zip(bad, out[1:-1]):
        assert isinstance(err, InferenceServerException), f"{why}: no error"
        assert err.status() == "StatusCode.INVALID_ARGUMENT", err
        assert error_code_of(err.message()) == "INVALID_ARGUMENT" and why in err.message(), err.message()


# -- llm -------------------------------------------------------------------------------------------
def _asr_prompt(tiny_model, seconds, seed):
    from stepaudio2.model.prompt import asr_messages, build_prompt

    return build_prompt(tiny_model.tokenizer, asr_messages(clip(int(seconds * 16000), seed)))


def test_llm_stream_with_audio_equals_in_process(triton, grpc, tiny_model):
    # 27 s of audio = two chunks (25 s + 2 s): two <audio_patch> runs to split.
    prompt = _asr_prompt(tiny_model, 27, 1)
    assert len(prompt.audio_chunks) == 2
    embeds = [encode(grpc, waveform=c) for c in prompt.audio_chunks]
    assert [e.shape[0] for e in embeds] == prompt.patch_counts
    want = tiny_model.generate(prompt.input_ids, tiny_model.encode_chunks(prompt.audio_chunks), max_new_tokens=12)
    got = llm_run(triton.urls.grpc, ids=prompt.input_ids, audio_embeds=np.concatenate(embeds), MAX_TOKENS=12)
    assert got["error"] is None, got["error"]
    assert got["ids"] == want
    assert got["reason"] == ("length" if len(want) == 12 else "stop")
    assert got["responses"] >= 2   # streamed, not one blob


def test_llm_sampling_controls_equal_in_process(triton, tiny_model):
    ids = tiny_model.tokenizer.encode("hello there, how are you?")
    kw = dict(temperature=0.9, top_p=0.8, top_k=50, repetition_penalty=1.1, seed=7, min_tokens=10)
    want = tiny_model.generate(ids, max_new_tokens=10, **kw)
    got = llm_run(triton.urls.grpc, ids=ids, MAX_TOKENS=10, TEMPERATURE=0.9, TOP_P=0.8, TOP_K=50,
                  REPETITION_PENALTY=1.1, SEED=7, MIN_TOKENS=10)
    assert got["ids"] == want and got["reason"] == "length"
    # A stop id ends the stream early with reason "stop"; the stop id itself is not sent.
    greedy = tiny_model.generate(ids, max_new_tokens=10)
    got = llm_run(triton.urls.grpc, ids=ids, MAX_TOKENS=10, stop_ids=[greedy[2]])
    assert got["reason"] == "stop"
    want = tiny_model.generate(ids, max_new_tokens=10, stop_ids=[greedy[2]])
    assert got["ids"] == want == greedy[:greedy.index(greedy[2])]


def test_llm_concurrent_streams_share_the_batch(triton, tiny_model):
    words = "one two three four five six seven eight nine ten".split()
    prompts = [tiny_model.tokenizer.encode(" ".join(words[: 2 + i])) for i in range(8)]
    want = [tiny_model.generate(p, max_new_tokens=24, min_tokens=24) for p in prompts]
    streams = [Stream(triton.urls.grpc) for _ in prompts]
    try:
        for i, (s, p) in enumerate(zip(streams, prompts)):
            s.send(f"c{i}", ids=p, MAX_TOKENS=24, MIN_TOKENS=24)
        got = [s.wait()[f"c{i}"] for i, s in enumerate(streams)]
    finally:
        for s in streams:
            s.close()
    for g, w in zip(got, want):
        assert g["error"] is None and g["reason"] == "length"
        assert g["ids"] == w
    peak = wait_metric(triton, "stepaudio2_llm_max_running_batch", lambda v: v > 1)
    assert peak is not None and peak > 1, f"max running batch {peak}: the streams never shared a batch"
    assert wait_metric(triton, "stepaudio2_llm_running_batch", lambda v: v == 0) == 0


def test_llm_bad_inputs_are_invalid_argument_and_server_keeps_serving(triton, tiny_model):
    prompt = _asr_prompt(tiny_model, 2, 2)
    n = sum(prompt.patch_counts)
    emb = np.zeros((n - 1, tiny_model.config.text.hidden_size), np.float32)
    s = Stream(triton.urls.grpc)
    try:
        s.send("embeds", ids=prompt.input_ids, audio_embeds=emb)
        s.send("empty", ids=[])
        s.send("top_p", ids=[1, 2, 3], TOP_P=1.5)
        s.send("vocab", ids=[1, 2, tiny_model.config.text.vocab_size + 5])
        res = s.wait()
    finally:
        s.close()
    for rid, needle in [("embeds", f"{n - 1} rows"), ("embeds", f"{n} <audio_patch>"), ("empty", "INPUT_IDS"),
                        ("top_p", "top_p"), ("vocab", "input_ids")]:
        msg = res[rid]["error"]
        assert msg is not None and error_code_of(msg) == "INVALID_ARGUMENT", (rid, msg)
        assert needle in msg, (rid, msg)
    want = tiny_model.generate([1, 2, 3], max_new_tokens=5)
    assert llm_run(triton.urls.grpc, ids=[1, 2, 3], MAX_TOKENS=5)["ids"] == want


def _wait_any(streams, timeout=WAIT_S):
    """Pump several streams until one of their requests is done; return that stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in streams:
            if any(v["done"] for v in s.results.values()):
                return s
            try:
                s._pump(0.05)
            except queue.Empty:
                pass
    raise TimeoutError("no request finished")


def test_llm_queue_full_and_cancel_frees_the_slot(triton_factory, tiny_model):
    # One sequence at a time and one waiting request: of two more requests sent while a long
    # one runs, one waits and the other is refused at once (which one: arrival order).
    server = triton_factory(models=["llm"], llm_max_batch=1, llm_max_queue=1)
    long_tokens = 4000
    a, b, c = Stream(server.urls.grpc), Stream(server.urls.grpc), Stream(server.urls.grpc)
    try:
        a.send("long", ids=[5, 6, 7], MAX_TOKENS=long_tokens, MIN_TOKENS=long_tokens)
        a.wait_first("long")                      # it holds the only slot now
        b.send("b", ids=[1, 2, 3], MAX_TOKENS=6)
        c.send("c", ids=[1, 2, 3], MAX_TOKENS=6)
        first = _wait_any([b, c])
        refused = next(iter(first.results.values()))
        assert refused["error"] is not None and error_code_of(refused["error"]) == "RESOURCE_EXHAUSTED", refused
        assert "queue is full" in refused["error"]
        assert not a.results["long"]["done"]      # refused for the queue, while the long one runs
        a.close(cancel=True)                      # client-side cancel of the long stream
        other = c if first is b else b
        queued = next(iter(other.wait().values()))   # runs in the freed slot
        assert queued["error"] is None and queued["ids"] == tiny_model.generate([1, 2, 3], max_new_tokens=6)
    finally:
        for s in (a, b, c):
            try:
                s.close(cancel=True)
            except Exception:  # noqa: BLE001 - already closed
                pass
    assert wait_metric(server, "stepaudio2_llm_cancelled_requests_total", lambda v: v >= 1) >= 1
    assert wait_metric(server, "stepaudio2_llm_rejected_requests_total", lambda v: v >= 1) >= 1
    assert wait_metric(server, "stepaudio2_llm_running_batch", lambda v: v == 0) == 0
    # The long request was cut, not run to its end.
    assert metrics(server)["stepaudio2_llm_generated_tokens_total"] < long_tokens


def test_model_that_cannot_load_fails_fast_with_the_log(tiny_ckpt, tmp_path):
    """A required parameter left unfilled: the model refuses to load, naming it; Triton
    exits (exit-on-error) and wait_ready raises at once with the log's tail."""
    from stepaudio2.runtime.model_repo import build_model_repo
    from stepaudio2.runtime.triton import TritonError, TritonServer

    repo = build_model_repo(tiny_ckpt, tmp_path / "repo", models=["llm"], num_threads=1)
    cfg = repo / "llm" / "config.pbtxt"
    cfg.write_text(re.sub(r'(key: "max_batch" value: \{ string_value: )"\d+"', r'\1"${llm_max_batch}"',
                          cfg.read_text()))
    server = TritonServer(repo, work_dir=tmp_path / "triton", exit_timeout_s=5).start()
    try:
        with pytest.raises(TritonError) as e:
            server.wait_ready(WAIT_S)
    finally:
        server.stop(grace_s=10)
    assert "exited with code" in str(e.value)
    assert "required model parameter 'max_batch' is missing" in str(e.value)
