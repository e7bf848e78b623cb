"""The orchestrator's public gRPC API against a REAL tritonserver (the `triton` fixture).

The orchestrator runs in-process on a free loopback port with a known API key. Random tiny
weights produce noise text; what matters is that the served path (decode -> segment ->
audio_encoder -> llm stream -> parser) gives exactly what the model gives in-process.
"""
from __future__ import annotations

import io
import re
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepaudio2.orchestrator.server import start_in_thread
from stepaudio2.orchestrator.settings import OrchestratorSettings
from stepaudio2.runtime.grpc_errors import error_info
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

SR = 16_000
TENANT, KEY = "acme", "test-key-0123456789"
AUTH = [("authorization", f"Bearer {KEY}")]
MAX_TOKENS = 8
MAX_AUDIO_SECONDS = 100.0
MAX_REQUEST_BYTES = 4 * 1024 * 1024
TIMEOUT = 120  # every test call has a deadline (reliability §2.1)


# -- audio made here, not downloaded --------------------------------------------------------

def tone(seconds: float, freq: float = 220.0, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, amp: float = 0.2, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32).clip(-1, 1)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def encode(x: np.ndarray, fmt: str = "WAV", subtype: str = "PCM_16", sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def short_clip() -> bytes:
    return encode(np.concatenate([tone(0.7, 330), noise(0.6, seed=1), tone(0.7, 180)]))


def request(data: bytes, **kw) -> assistant_pb2.TranscribeRequest:
    audio = common_pb2.AudioChunk(data=data, encoding=kw.pop("encoding", common_pb2.AUDIO_ENCODING_UNSPECIFIED),
                                  sample_rate_hz=kw.pop("sample_rate_hz", 0))
    return assistant_pb2.TranscribeRequest(audio=audio, **kw)


# -- fixtures ---------------------------------------------------------------------------------

def _settings(model_dir, triton_url: str, **kw) -> OrchestratorSettings:
    return OrchestratorSettings(model_dir=model_dir, host="127.0.0.1", port=0, triton_url=triton_url,
                                api_keys=f"{TENANT}:{KEY}", max_tokens_per_segment=MAX_TOKENS,
                                max_audio_seconds=MAX_AUDIO_SECONDS, max_request_bytes=MAX_REQUEST_BYTES,
                                readiness_poll_s=0.2, grace_period_s=0.0, **kw)


def _wait_serving(channel: grpc.Channel, service: str = "", limit_s: float = 60.0) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + limit_s
    status = None
    while time.monotonic() < end:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.1)
    return status


@pytest.fixture(scope="module")
def orchestrator(triton, tiny_ckpt):
    with start_in_thread(_settings(tiny_ckpt, triton.urls.grpc)) as orch:
        yield orch


@pytest.fixture(scope="module")
def channel(orchestrator):
    ch = grpc.insecure_channel(orchestrator.address)
    assert _wait_serving(ch) == health_pb2.HealthCheckResponse.SERVING
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return assistant_pb2_grpc.AssistantStub(channel)


def in_process_text(model, wav: bytes, max_new_tokens: int, extra: str = "") -> tuple[str, int, int]:
    """(text, generated tokens, prompt tokens) of greedy ASR with the model in this process."""
    from stepaudio2.model.parser import OutputParser, TextDelta
    from stepaudio2.model.prompt import asr_messages, build_prompt

    messages = asr_messages(wav)
    if extra:
        messages[1]["content"].append({"type": "text", "text": extra})
    prompt = build_prompt(model.tokenizer, messages)
    ids = model.generate(prompt.input_ids, model.encode_chunks(prompt.audio_chunks), max_new_tokens=max_new_tokens)
    parser = OutputParser(model.tokenizer)
    events = [e for i in ids for e in parser.feed(i)] + parser.finish()
    return "".join(e.text for e in events if isinstance(e, TextDelta)), len(ids), len(prompt.input_ids)


def expect_error(fn, code: grpc.StatusCode, reason: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    if reason is not None:
        info = error_info(e.value)
        assert info is not None and info.reason == reason and info.domain == "stepaudio2", info
    return e.value


# -- tests ------------------------------------------------------------------------------------

def test_health_serving_and_models(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "stepaudio2.v1.Assistant", "liveness"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    models = stub.ListModels(assistant_pb2.ListModelsRequest(), metadata=AUTH, timeout=TIMEOUT).models
    assert [m.id for m in models] == ["step-audio-2-tiny"]


@pytest.mark.parametrize("extra", ["", "Numbers: one two three."])
def test_transcribe_equals_in_process_greedy(stub, tiny_model, extra):
    wav = short_clip()
    expected, n_tokens, n_prompt = in_process_text(tiny_model, wav, MAX_TOKENS, extra)
    resp = stub.Transcribe(request(wav, prompt=extra), metadata=AUTH, timeout=TIMEOUT)
    assert resp.text == expected
    assert len(resp.segments) == 1
    seg = resp.segments[0]
    assert (seg.index, seg.start_s, seg.text, seg.tokens) == (0, 0.0, expected, n_tokens)
    assert seg.end_s == pytest.approx(2.0) and resp.duration_s == pytest.approx(2.0)
    assert resp.model == "step-audio-2-tiny"
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == n_tokens
    assert resp.usage.audio_seconds_milli == 2000


def test_transcribe_stream_deltas_make_the_text(stub):
    events = list(stub.TranscribeStream(request(short_clip(), max_tokens_per_segment=24), metadata=AUTH,
                                        timeout=TIMEOUT))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and kinds.count("segment") == 1
    assert kinds.index("segment") == len(kinds) - 2               # deltas, then the segment, then done
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert all(d.segment_index == 0 for d in deltas)
    final = events[-1].done
    assert "".join(d.text for d in deltas) == final.text == events[-2].segment.text
    assert 0 < final.segments[0].tokens <= 24


def long_audio() -> np.ndarray:
    """70 s: loud stretches (tones, noise) with short quiet gaps, so cuts have pauses to find."""
    parts, t, k = [], 0.0, 0
    while t < 70.0:
        loud = [tone(4.0, 150 + 40 * k), noise(3.0, seed=k), tone(2.5, 400 - 20 * k)][k % 3]
        gap = silence(0.4 if k % 2 else 0.25)
        parts += [loud, gap]
        t += (len(loud) + len(gap)) / SR
        k += 1
    return np.concatenate(parts)[: 70 * SR]


def test_long_audio_is_segmented_at_pauses(stub):
    x = long_audio()
    resp = stub.Transcribe(request(encode(x, "FLAC"), encoding=common_pb2.AUDIO_ENCODING_FLAC), metadata=AUTH,
                           timeout=TIMEOUT)
    segs = resp.segments
    assert len(segs) >= 3
    assert [s.index for s in segs] == list(range(len(segs)))
    assert segs[0].start_s == 0.0 and segs[-1].end_s == pytest.approx(70.0)
    for a, b in zip(segs, segs[1:]):
        assert a.end_s <= b.start_s and b.start_s > a.start_s     # increasing, non-overlapping
    for s in segs:
        assert 0 < s.end_s - s.start_s <= 25.0
        # each cut lies in a quiet gap: the audio around it is silent
        cut = int(round(s.end_s * SR))
        if cut < len(x):
            assert np.abs(x[max(0, cut - 80): cut + 80]).max() == 0.0
    assert resp.text == " ".join(s.text for s in segs if s.text)
    assert resp.duration_s == pytest.approx(70.0)
    assert resp.usage.audio_seconds_milli == 70_000
    assert resp.usage.completion_tokens == sum(s.tokens for s in segs)


def test_missing_or_wrong_api_key(stub):
    req = assistant_pb2.ListModelsRequest()
    for md in ([], [("authorization", "Bearer wrong-key")], [("authorization", KEY)]):
        expect_error(lambda: stub.ListModels(req, metadata=md, timeout=TIMEOUT),
                     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        expect_error(lambda: list(stub.TranscribeStream(request(short_clip()), metadata=md, timeout=TIMEOUT)),
                     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def _header_only_wav() -> bytes:
    return encode(np.zeros(0, dtype=np.float32))


def _nan_wav() -> bytes:
    x = tone(0.5)
    x[100] = np.nan
    return encode(x, subtype="FLOAT")


BAD_INPUTS = {
    "empty": (lambda: request(b""), "INVALID_ARGUMENT", "empty"),
    "header_only_wav": (lambda: request(_header_only_wav()), "INVALID_ARGUMENT", "no samples"),
    "garbage": (lambda: request(np.random.default_rng(3).bytes(4000), encoding=common_pb2.AUDIO_ENCODING_WAV),
                "UNSUPPORTED_MEDIA", "WAV, FLAC or OGG"),
    "nan_float_wav": (lambda: request(_nan_wav()), "INVALID_ARGUMENT", "NaN"),
    "pcm16_without_rate": (lambda: request(b"\x00\x01" * 800, encoding=common_pb2.AUDIO_ENCODING_PCM16),
                           "INVALID_ARGUMENT", "sample_rate_hz"),
    # 101 s at 8 kHz: refused from the header, before decoding (and small to send).
    "too_long": (lambda: request(encode(np.zeros(int((MAX_AUDIO_SECONDS + 1) * 8000), np.float32), sr=8000)),
                 "TOO_LARGE", "longer than"),
    "too_many_bytes": (lambda: request(b"RIFF" + bytes(MAX_REQUEST_BYTES)), "TOO_LARGE", "bytes"),
    "declared_flac_is_wav": (lambda: request(short_clip(), encoding=common_pb2.AUDIO_ENCODING_FLAC),
                             "INVALID_ARGUMENT", "data is WAV"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_audio_is_refused_and_the_next_request_works(stub, case):
    make, reason, words = BAD_INPUTS[case]
    err = expect_error(lambda: stub.Transcribe(make(), metadata=AUTH, timeout=TIMEOUT),
                       grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert words in err.details()
    assert "Traceback" not in err.details()
    ok = stub.Transcribe(request(encode(tone(1.0)), max_tokens_per_segment=1), metadata=AUTH, timeout=TIMEOUT)
    assert len(ok.segments) == 1 and ok.usage.completion_tokens <= 1


def test_pcm16_with_rate_is_resampled(stub):
    x = (tone(1.5) * 32767).astype("<i2")  # 1.5 s at 16 kHz = 3 s worth of samples at 8 kHz
    resp = stub.Transcribe(request(x.tobytes(), encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=8000,
                                   max_tokens_per_segment=1), metadata=AUTH, timeout=TIMEOUT)
    assert resp.duration_s == pytest.approx(3.0)


def test_unknown_model_and_bad_controls(stub):
    expect_error(lambda: stub.Transcribe(request(short_clip(), model="whisper-1"), metadata=AUTH, timeout=TIMEOUT),
                 grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    expect_error(lambda: stub.Transcribe(request(short_clip(), temperature=-1.0), metadata=AUTH, timeout=TIMEOUT),
                 grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    expect_error(lambda: stub.Transcribe(request(short_clip(), prompt="x<|EOT|>y"), metadata=AUTH, timeout=TIMEOUT),
                 grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    expect_error(lambda: stub.GetSession(assistant_pb2.GetSessionRequest(session_id="s"), metadata=AUTH,
                                         timeout=TIMEOUT), grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED")


def test_deadline_is_enforced_and_the_server_recovers(stub):
    expect_error(lambda: stub.Transcribe(request(encode(long_audio(), "FLAC"), max_tokens_per_segment=64),
                                         metadata=AUTH, timeout=0.2),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    ok = stub.Transcribe(request(encode(tone(1.0)), max_tokens_per_segment=1), metadata=AUTH, timeout=TIMEOUT)
    assert len(ok.segments) == 1


def _llm_counters(metrics_url: str) -> dict[str, float]:
    """The llm engine's Prometheus series (summed over labels), e.g. cancelled/completed."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^stepaudio2_llm_(\w+)\{[^}]*\} (\S+)$", text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _counters_after_a_request(stub, metrics_url: str) -> dict[str, float]:
    """The engine publishes its counters from request callbacks, at the latest when it goes
    idle after a request's final response: one small finished request makes everything
    before it visible."""
    stub.Transcribe(request(encode(tone(1.0)), max_tokens_per_segment=1), metadata=AUTH, timeout=TIMEOUT)
    return _llm_counters(metrics_url)


def test_client_cancel_cancels_the_triton_stream(stub, triton):
    metrics = triton.urls.metrics
    before = _counters_after_a_request(stub, metrics)
    call = stub.TranscribeStream(request(short_clip(), max_tokens_per_segment=4000), metadata=AUTH,
                                 timeout=TIMEOUT)
    first = next(call)
    assert first.WhichOneof("event") == "delta"
    call.cancel()
    # The cancel travels client -> orchestrator -> Triton stream -> engine, which drops the
    # sequence long before its 4000 tokens; the next request still works.
    after = _counters_after_a_request(stub, metrics)
    assert after["cancelled_requests_total"] == before["cancelled_requests_total"] + 1, (before, after)
    assert after["completed_requests_total"] == before["completed_requests_total"] + 1, (before, after)
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < 4000


def test_triton_unreachable_is_unavailable(tiny_ckpt):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()  # nothing listens there now
    with start_in_thread(_settings(tiny_ckpt, f"127.0.0.1:{closed}")) as orch, \
            grpc.insecure_channel(orch.address) as ch:
        stub = assistant_pb2_grpc.AssistantStub(ch)
        err = expect_error(lambda: stub.Transcribe(request(short_clip()), metadata=AUTH, timeout=TIMEOUT),
                           grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
        assert f"inference server unavailable at 127.0.0.1:{closed}" in err.details()
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_graceful_shutdown_drains_in_flight_calls(triton, tiny_ckpt):
    import threading

    orch = start_in_thread(_settings(tiny_ckpt, triton.urls.grpc))
    stopper = threading.Thread(target=orch.stop, kwargs={"grace": 60.0})
    try:
        with grpc.insecure_channel(orch.address) as ch:
            assert _wait_serving(ch) == health_pb2.HealthCheckResponse.SERVING
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stream = assistant_pb2_grpc.AssistantStub(ch).TranscribeStream(
                request(short_clip(), max_tokens_per_segment=200), metadata=AUTH, timeout=TIMEOUT)
            first = next(stream)                     # the call is in flight ...
            stopper.start()                          # ... when shutdown begins
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()                           # a Watch would otherwise hold the grace period
            rest = [first] + list(stream)            # the in-flight call still completes
            assert rest[-1].WhichOneof("event") == "done"
            assert rest[-1].done.segments[0].tokens > 0
    finally:
        if stopper.ident is None:   # failed before shutdown began: stop it now
            stopper.start()
        stopper.join()


# -- the typed Triton clients on their own ---------------------------------------------------

def test_triton_clients_map_model_errors(triton):
    import asyncio

    from stepaudio2.runtime.errors import InvalidArgument
    from stepaudio2.runtime.triton_client import GenerationParams, TritonClients

    async def run():
        async with TritonClients(triton.urls.grpc) as client:
            assert await client.ready()
            bad = tone(0.5)
            bad[7] = np.nan
            with pytest.raises(InvalidArgument, match="NaN"):
                await client.encode_audio([tone(0.5), bad])
            with pytest.raises(InvalidArgument, match="INPUT_IDS|input_ids|vocab"):
                async for _ in client.generate([10 ** 6], [], GenerationParams(max_tokens=2)):
                    pass
            # Concurrent chunks come back in order, one [N_i, D] array each.
            short, long = await client.encode_audio([tone(1.0), tone(3.0)])
            assert short.ndim == long.ndim == 2 and short.shape[0] < long.shape[0]

    asyncio.run(run())


def test_triton_queue_full_is_resource_exhausted(triton):
    import asyncio

    from stepaudio2.runtime.errors import ResourceExhausted
    from stepaudio2.runtime.triton_client import GenerationParams, TritonClients, gather_or_cancel

    # More long requests at once than the session server's llm runs + queues: the surplus is
    # refused at once, and the first refusal cancels the others (the queue drains quickly).
    n = 64  # > llm_max_batch + llm_max_queue of the session server (8 + 32, conftest.py)

    async def one(client, i):
        async for _ in client.generate([5, 6, 7 + i], [], GenerationParams(max_tokens=1000)):
            pass

    async def run():
        async with TritonClients(triton.urls.grpc) as client:
            with pytest.raises(ResourceExhausted, match="queue is full") as e:
                await gather_or_cancel([one(client, i) for i in range(n)])
            assert e.value.mapping.grpc == "RESOURCE_EXHAUSTED"
            await asyncio.sleep(0.5)  # let the cancellations reach Triton before the channel closes

    asyncio.run(run())
