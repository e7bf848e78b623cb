"""Text to speech end to end over the real stack: tritonserver (the shared ``triton``
fixture: audio_encoder, llm, token2wav, voice_encoder over the tiny checkpoint), the
orchestrator and the gateway in-process (``LocalStack``).

Random tiny weights rarely emit speech codes by themselves, so the requests drive them
with the sampling controls users also get (PUBLIC_API.md): ``allowed_token_ids`` = a
range of speech-code ids plus ``<|EOT|>``, ``min_tokens`` and a seed.
"""
from __future__ import annotations

import io
import re
import struct
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import tritonclient.grpc as grpcclient

from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.stack import LocalStack
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2
from tests.integration.s3 import s3_server  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[2]
VOICE_WAV = ROOT / "assets" / "voices" / "default_male.wav"
SAMPLES_PER_CODE = 960          # 24 kHz, 25 codes per second
N_CODES = 60


@pytest.fixture(scope="module")
def stack(triton, tiny_ckpt):
    with LocalStack(tiny_ckpt, triton_server=triton) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.grpc_address) as channel:
        yield assistant_pb2_grpc.AssistantStub(channel)


@pytest.fixture(scope="module")
def md(stack):
    return (("authorization", f"Bearer {stack.api_key}"),)


@pytest.fixture(scope="module")
def special(tiny_ckpt):
    return StepAudioTokenizer.from_dir(tiny_ckpt).special


def speech_sampling(special, n: int = N_CODES, seed: int = 7) -> common_pb2.SamplingOptions:
    """Exactly ``n`` speech codes: only code ids (and <|EOT|>) allowed, EOT banned before n."""
    allowed = list(range(special.audio_code_base, special.audio_code_base + 500)) + [special.eot]
    return common_pb2.SamplingOptions(temperature=1.0, seed=seed, min_tokens=n, max_tokens=n,
                                      allowed_token_ids=allowed)


def _synth(stub, md, **fields):
    return list(stub.Synthesize(assistant_pb2.SynthesizeRequest(**fields), metadata=md, timeout=120))


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()


def _metric(triton, name: str) -> float:
    text = urllib.request.urlopen(triton.urls.metrics, timeout=10).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in Triton's metrics"
    return float(m.group(1))


def _wait_metric(triton, name: str, want: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    value = _metric(triton, name)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.2)
        value = _metric(triton, name)
    return value


# ---------------------------------------------------------------------------- gRPC Synthesize
def test_synthesize_streams_wav_for_every_speech_code(stub, md, special):
    events = _synth(stub, md, text="Hello there.", voice="default_female", sampling=speech_sampling(special))
    audio = [e for e in events if e.audio.data]
    assert len(audio) >= 3, "60 codes make 3 token2wav chunks (28, 28, remainder): audio must stream"
    assert sum(e.speech_tokens for e in events) == N_CODES
    last = events[-1]
    assert last.HasField("usage") and not any(e.HasField("usage") for e in events[:-1])
    assert last.usage.completion_tokens == N_CODES
    assert last.usage.audio_seconds_milli == N_CODES * SAMPLES_PER_CODE * 1000 // 24_000
    body = b"".join(e.audio.data for e in events)
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", body[24:28])[0] == 24_000
    pcm = np.frombuffer(body[44:], dtype="<i2")
    assert pcm.size == N_CODES * SAMPLES_PER_CODE
    assert np.abs(pcm).max() > 0
    assert all(e.audio.sample_rate_hz == 24_000 for e in audio)


def test_synthesize_is_reproducible_with_a_seed(stub, md, special):
    kw = dict(text="Same seed, same audio.", voice="default_male", encoding=common_pb2.AUDIO_ENCODING_PCM16,
              sampling=speech_sampling(special, n=40, seed=11))
    a = b"".join(e.audio.data for e in _synth(stub, md, **kw))
    b = b"".join(e.audio.data for e in _synth(stub, md, **kw))
    assert len(a) == 40 * SAMPLES_PER_CODE * 2
    assert a == b


def test_synthesize_formats_and_speed(stub, md, special):
    for enc, fmt in ((common_pb2.AUDIO_ENCODING_FLAC, "FLAC"), (common_pb2.AUDIO_ENCODING_MP3, "MP3")):
        events = _synth(stub, md, text="Formats.", encoding=enc, sampling=speech_sampling(special, n=30))
        assert [bool(e.audio.data) for e in events] == [False] * (len(events) - 1) + [True], \
            f"{fmt} is encoded whole and sent in the last event"
        x, sr = sf.read(io.BytesIO(events[-1].audio.data))
        assert sr == 24_000
        # MP3 frames pad the end (1152-sample frames): allow one frame plus encoder delay.
        assert abs(x.shape[0] - 30 * SAMPLES_PER_CODE) <= (0 if fmt == "FLAC" else 2 * 1152)
    events = _synth(stub, md, text="Faster.", encoding=common_pb2.AUDIO_ENCODING_PCM16, speed=2.0,
                    sampling=speech_sampling(special, n=40))
    pcm = b"".join(e.audio.data for e in events)
    assert len(pcm) // 2 == round(40 * SAMPLES_PER_CODE / 2.0)


@pytest.mark.parametrize("fields, code, needle", [
    (dict(text="hi", voice="nobody"), grpc.StatusCode.NOT_FOUND, "nobody"),
    (dict(text="hi", voice="Bad Voice!"), grpc.StatusCode.INVALID_ARGUMENT, "voice id"),
    (dict(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(text="hi", model="other-model"), grpc.StatusCode.NOT_FOUND, "other-model"),
    (dict(text="hi", speed=9.0), grpc.StatusCode.INVALID_ARGUMENT, "speed"),
    (dict(text="hi", encoding=common_pb2.AUDIO_ENCODING_OGG), grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
    (dict(text="hi <|EOT|> there"), grpc.StatusCode.INVALID_ARGUMENT, "control token"),
    (dict(text="hi", sampling=common_pb2.SamplingOptions(temperature=5.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(text="hi", sampling=common_pb2.SamplingOptions(allowed_token_ids=[10**9])),
     grpc.StatusCode.INVALID_ARGUMENT, "allowed_token_ids"),
])
def test_synthesize_bad_requests(stub, md, special, fields, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        _synth(stub, md, **fields)
    assert _code(info.value) == code, info.value.details()
    assert needle in info.value.details()
    # and the next good request is served
    events = _synth(stub, md, text="still fine", sampling=speech_sampling(special, n=10))
    assert sum(e.speech_tokens for e in events) == 10


# ---------------------------------------------------------------------------- Triton token2wav
def _t2w_request(client, sid, tokens, *, start=False, end=False, voice=None, seed=None, cancel=False):
    inputs = []
    t = grpcclient.InferInput("TOKENS", [1, len(tokens)], "INT32")
    t.set_data_from_numpy(np.asarray([tokens], dtype=np.int32))
    inputs.append(t)
    if voice is not None:
        v = grpcclient.InferInput("VOICE", [1, 1], "BYTES")
        v.set_data_from_numpy(np.array([[voice.encode()]], dtype=np.object_))
        inputs.append(v)
    if seed is not None:
        s = grpcclient.InferInput("SEED", [1, 1], "INT64")
        s.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
        inputs.append(s)
    if cancel:
        c = grpcclient.InferInput("CANCEL", [1, 1], "BOOL")
        c.set_data_from_numpy(np.array([[True]]))
        inputs.append(c)
    r = client.infer("token2wav", inputs, sequence_id=sid, sequence_start=start, sequence_end=end or cancel)
    return r.as_numpy("AUDIO").reshape(-1)


def _protocol_chunks(codes):
    """28-code chunks overlapping by 3, then the remainder (spec §3.6)."""
    out, buf = [], list(codes)
    while len(buf) >= 28:
        out.append(buf[:28])
        buf = buf[25:]
    return out, buf


def _run_stream(client, sid, codes, voice, seed):
    chunks, rest = _protocol_chunks(codes)
    audio = [_t2w_request(client, sid, c, start=(i == 0), voice=voice if i == 0 else None,
                          seed=seed if i == 0 else None) for i, c in enumerate(chunks)]
    audio.append(_t2w_request(client, sid, rest, end=True))
    return audio


def _solo_in_process(tiny_ckpt, voices_dir, codes, voice_id, seed):
    from stepaudio2.model.token2wav import Token2Wav
    from stepaudio2.runtime.voice_store import LocalVoiceStore

    t2w = Token2Wav.from_pretrained(tiny_ckpt)
    v = LocalVoiceStore(voices_dir).get(voice_id)
    stream = t2w.stream(v.prompt_tokens, v.prompt_mel, v.speaker_embedding,
                        generator=torch.Generator().manual_seed(seed))
    chunks, rest = _protocol_chunks(codes)
    return [stream.push(c).numpy() for c in chunks] + [stream.push(rest, last=True).numpy()]


def test_token2wav_on_triton_matches_in_process_and_streams_do_not_mix(triton, tiny_ckpt):
    rng = np.random.RandomState(3)
    jobs = {101: (rng.randint(0, 6561, 80).tolist(), "default_female", 5),
            202: (rng.randint(0, 6561, 67).tolist(), "default_male", 6)}
    results: dict[int, list] = {}
    errors = []

    def run(sid):
        try:
            with grpcclient.InferenceServerClient(triton.urls.grpc) as client:
                codes, voice, seed = jobs[sid]
                results[sid] = _run_stream(client, sid, codes, voice, seed)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for sid, (codes, voice, seed) in jobs.items():
        solo = _solo_in_process(tiny_ckpt, triton.voices_dir, codes, voice, seed)
        got = results[sid]
        assert [len(a) for a in got] == [len(a) for a in solo]
        assert sum(len(a) for a in got) == len(codes) * SAMPLES_PER_CODE
        # Streams batched together pad to a common length: the PUBLIC_API streaming tolerance.
        worst = max(float(np.abs(a - b).max()) for a, b in zip(got, solo))
        assert worst <= 1e-2, f"stream {sid} ({voice}) differs from its solo run by {worst}"


def test_token2wav_state_is_freed_on_last_chunk_and_cancel(triton):
    with grpcclient.InferenceServerClient(triton.urls.grpc) as client:
        codes = list(range(100, 156))
        base_finished = _metric(triton, "stepaudio2_token2wav_finished_streams_total")
        _run_stream(client, 301, codes, "default_female", 1)
        assert _wait_metric(triton, "stepaudio2_token2wav_live_streams", 0) == 0
        assert _metric(triton, "stepaudio2_token2wav_finished_streams_total") == base_finished + 1

        base_cancelled = _metric(triton, "stepaudio2_token2wav_cancelled_streams_total")
        _t2w_request(client, 302, codes[:28], start=True, voice="default_male")
        assert _metric(triton, "stepaudio2_token2wav_live_streams") == 1
        out = _t2w_request(client, 302, [], cancel=True)
        assert out.size == 0
        assert _metric(triton, "stepaudio2_token2wav_live_streams") == 0
        assert _metric(triton, "stepaudio2_token2wav_cancelled_streams_total") == base_cancelled + 1

        # unknown voice: NOT_FOUND, no state kept
        with pytest.raises(Exception) as info:
            _t2w_request(client, 303, codes[:28], start=True, voice="nobody")
        assert "NOT_FOUND" in str(info.value)
        _t2w_request(client, 303, [], cancel=True)      # Triton's sequence slot too
        assert _metric(triton, "stepaudio2_token2wav_live_streams") == 0


def test_token2wav_state_is_freed_after_the_idle_timeout(triton_factory):
    server = triton_factory(models=["token2wav"], t2w_idle_timeout_s=1.0)
    with grpcclient.InferenceServerClient(server.urls.grpc) as client:
        _t2w_request(client, 401, list(range(28)), start=True, voice="default_female")
        assert _metric(server, "stepaudio2_token2wav_live_streams") == 1
        time.sleep(3.0)           # past the idle timeout (the sweeper runs every 0.25 s)
        # Triton released the sequence too: a chunk without START is refused by Triton.
        with pytest.raises(Exception) as info:
            _t2w_request(client, 401, list(range(25, 53)))
        assert "START" in str(info.value)
        # Metrics are published from request threads: any request refreshes them.
        _t2w_request(client, 402, list(range(10)), start=True, end=True, voice="default_male")
        assert _metric(server, "stepaudio2_token2wav_expired_streams_total") >= 1
        assert _metric(server, "stepaudio2_token2wav_live_streams") == 0


def test_cancelled_synthesize_frees_the_token2wav_stream(stub, md, special, triton):
    req = assistant_pb2.SynthesizeRequest(text="A long one.", encoding=common_pb2.AUDIO_ENCODING_PCM16,
                                          sampling=speech_sampling(special, n=400))
    call = stub.Synthesize(req, metadata=md, timeout=120)
    first = next(call)
    assert first.audio.data
    call.cancel()
    assert _wait_metric(triton, "stepaudio2_token2wav_live_streams", 0) == 0


# ---------------------------------------------------------------------------- voices
def _register(stub, md, voice_id, data, **kw):
    return stub.RegisterVoice(assistant_pb2.RegisterVoiceRequest(
        voice_id=voice_id, audio=common_pb2.AudioChunk(data=data), **kw), metadata=md, timeout=60)


def _wav(x, sr=16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, dtype=np.float32), sr, format="WAV")
    return buf.getvalue()


def test_voice_lifecycle_over_grpc(stub, md, special):
    info = _register(stub, md, "test-voice", VOICE_WAV.read_bytes(), name="Test", description="a test voice")
    assert (info.voice_id, info.name, info.description, info.builtin) == ("test-voice", "Test", "a test voice", False)
    assert info.prompt_tokens > 0
    ids = [v.voice_id for v in stub.ListVoices(assistant_pb2.ListVoicesRequest(), metadata=md).voices]
    assert {"default_female", "default_male", "test-voice"} <= set(ids)
    assert stub.GetVoice(assistant_pb2.GetVoiceRequest(voice_id="test-voice"), metadata=md).prompt_tokens == \
        info.prompt_tokens
    with pytest.raises(grpc.RpcError) as dup:
        _register(stub, md, "test-voice", VOICE_WAV.read_bytes())
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    events = _synth(stub, md, text="In my own voice.", voice="test-voice", sampling=speech_sampling(special, n=30))
    assert sum(e.speech_tokens for e in events) == 30
    stub.DeleteVoice(assistant_pb2.DeleteVoiceRequest(voice_id="test-voice"), metadata=md)
    with pytest.raises(grpc.RpcError) as gone:
        _synth(stub, md, text="gone", voice="test-voice")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as gone:
        stub.DeleteVoice(assistant_pb2.DeleteVoiceRequest(voice_id="test-voice"), metadata=md)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name, data, code, needle", [
    ("too-short", _wav(0.1 * np.sin(np.arange(8000) / 5.0)), grpc.StatusCode.INVALID_ARGUMENT, "at least"),
    ("silent", _wav(np.zeros(32000)), grpc.StatusCode.INVALID_ARGUMENT, "silent"),
    ("not-audio", b"this is not audio at all" * 50, grpc.StatusCode.INVALID_ARGUMENT, "audio"),
    ("empty", b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
])
def test_bad_voice_clips_are_refused(stub, md, name, data, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        _register(stub, md, f"bad-{name}", data)
    assert info.value.code() == code
    assert needle in info.value.details()
    ids = [v.voice_id for v in stub.ListVoices(assistant_pb2.ListVoicesRequest(), metadata=md).voices]
    assert f"bad-{name}" not in ids


# ---------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)


def _extra(special, n=30):
    s = speech_sampling(special, n=n)
    return {"seed": s.seed, "temperature": s.temperature, "min_tokens": n, "max_tokens": n,
            "allowed_token_ids": list(s.allowed_token_ids)}


@pytest.mark.parametrize("fmt, media", [("wav", "audio/wav"), ("pcm", "audio/pcm"), ("flac", "audio/flac"),
                                        ("mp3", "audio/mpeg")])
def test_http_speech_with_the_openai_sdk(client, stack, special, fmt, media):
    with client.audio.speech.with_streaming_response.create(
            model=stack.model_id, voice="default_male", input="Hello from the gateway.", response_format=fmt,
            extra_body=_extra(special)) as resp:
        assert resp.headers["content-type"] == media
        body = b"".join(resp.iter_bytes())
    n = 30 * SAMPLES_PER_CODE
    if fmt == "pcm":
        assert len(body) == 2 * n
    elif fmt == "wav":
        assert body[:4] == b"RIFF" and len(body) == 44 + 2 * n
    else:
        x, sr = sf.read(io.BytesIO(body))
        assert sr == 24_000 and abs(x.shape[0] - n) <= (0 if fmt == "flac" else 2 * 1152)


def test_http_speech_and_voice_errors(stack):
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.http_url, timeout=120, headers=auth) as http:
        r = http.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "voice"
        r = http.post("/v1/audio/speech", json={"input": "hi", "response_format": "opus"})
        assert r.status_code == 400 and "opus" in r.json()["error"]["message"]
        r = http.post("/v1/audio/speech", json={"input": "", "voice": "default_male"})
        assert r.status_code == 400
        r = http.post("/v1/audio/speech", json={"input": "hi", "model": "nope"})
        assert r.status_code == 404
        r = http.post("/v1/audio/voices", files={"file": ("x.wav", b"not audio" * 100)}, data={"voice_id": "x1"})
        assert r.status_code == 415, r.text
        r = http.post("/v1/audio/voices", files={"file": ("s.wav", _wav(np.zeros(32000)))}, data={"voice_id": "x2"})
        assert r.status_code == 400 and "silent" in r.json()["error"]["message"]
        r = http.post("/v1/audio/voices", files={"file": ("v.wav", VOICE_WAV.read_bytes())},
                      data={"voice_id": "http-voice", "name": "HTTP"})
        assert r.status_code == 201 and r.json()["id"] == "http-voice"
        r = http.post("/v1/audio/voices", files={"file": ("v.wav", VOICE_WAV.read_bytes())},
                      data={"voice_id": "http-voice"})
        assert r.status_code == 409
        assert "http-voice" in [v["id"] for v in http.get("/v1/audio/voices").json()["data"]]
        assert http.get("/v1/audio/voices/http-voice").json()["name"] == "HTTP"
        assert http.delete("/v1/audio/voices/http-voice").json() == {"id": "http-voice", "object": "voice",
                                                                     "deleted": True}
        assert http.get("/v1/audio/voices/http-voice").status_code == 404
        assert httpx.get(f"{stack.http_url}/v1/audio/voices").status_code == 401


# ---------------------------------------------------------------------------- voices in S3
def test_voice_library_in_s3_end_to_end(s3_server, tiny_ckpt, triton_factory, special, monkeypatch):
    """With STEPAUDIO2_VOICES_S3_* set (no folder), Triton's token2wav registers the built-in
    voices in the S3 server and reads voices from it; the orchestrator registers a new voice
    there; synthesis in that voice works; deleting it removes its objects."""
    from tests.integration.s3 import ACCESS_KEY, REGION, SECRET_KEY

    prefix = f"e2e-{time.time_ns()}/voices"
    env = {"STEPAUDIO2_VOICES_S3_ENDPOINT": s3_server.endpoint, "STEPAUDIO2_VOICES_S3_ACCESS_KEY": ACCESS_KEY,
           "STEPAUDIO2_VOICES_S3_SECRET_KEY": SECRET_KEY, "STEPAUDIO2_VOICES_S3_REGION": REGION,
           "STEPAUDIO2_VOICES_S3_BUCKET": "stepaudio2-e2e", "STEPAUDIO2_VOICES_S3_PREFIX": prefix}
    for k, v in env.items():
        monkeypatch.setenv(k, v)           # inherited by tritonserver and read by the orchestrator
    server = triton_factory(voices_dir=None)
    client = s3_server.client()
    keys = lambda: sorted(o.object_name for o in client.list_objects("stepaudio2-e2e", prefix=prefix + "/",  # noqa: E731
                                                                      recursive=True))
    assert {k.split("/")[-2] for k in keys()} == {"default_female", "default_male"}
    with LocalStack(tiny_ckpt, triton_server=server) as stack:
        assert stack.voices_dir is None
        md = (("authorization", f"Bearer {stack.api_key}"),)
        with grpc.insecure_channel(stack.grpc_address) as channel:
            stub = assistant_pb2_grpc.AssistantStub(channel)
            _register(stub, md, "s3-voice", VOICE_WAV.read_bytes(), name="In S3")
            assert f"{prefix}/s3-voice/voice.json" in keys()
            events = _synth(stub, md, text="From S3.", voice="s3-voice", sampling=speech_sampling(special, n=30))
            assert sum(e.speech_tokens for e in events) == 30
            stub.DeleteVoice(assistant_pb2.DeleteVoiceRequest(voice_id="s3-voice"), metadata=md)
            assert not [k for k in keys() if "/s3-voice/" in k]


def test_concurrent_synthesize_with_cancellations_leaks_nothing(stub, md, special, triton):
    """A bounded version of bench/soak_synthesize.py: 3 rounds of 10 concurrent requests,
    every other one cancelled after its first or second audio event (a token2wav chunk is
    then often in flight); the rest complete with every code's audio, no token2wav state is
    left behind after any round, and the service still answers."""
    import concurrent.futures

    def one(i):
        req = assistant_pb2.SynthesizeRequest(text=f"Request {i}.", voice=("default_female", "default_male")[i % 2],
                                              encoding=common_pb2.AUDIO_ENCODING_PCM16,
                                              sampling=speech_sampling(special, n=80, seed=i))
        call = stub.Synthesize(req, metadata=md, timeout=180)
        if i % 2:
            for _ in range(1 + (i // 2) % 2):
                next(call)
            call.cancel()
            return None
        return sum(len(e.audio.data) for e in call) // 2

    for round_ in range(3):
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            samples = list(pool.map(one, range(10 * round_, 10 * round_ + 10)))
        assert [s for s in samples if s is not None] == [80 * SAMPLES_PER_CODE] * 5
        # (a leak would show until the 60 s idle timeout: 30 s is plenty to see it)
        assert _wait_metric(triton, "stepaudio2_token2wav_live_streams", 0, timeout=30) == 0, f"round {round_}"
    events = _synth(stub, md, text="after the storm", sampling=speech_sampling(special, n=10))
    assert sum(e.speech_tokens for e in events) == 10


def test_http_client_leaving_mid_speech_frees_the_stream(stack, special, triton):
    """The HTTP client reads the first audio bytes of a long wav and disconnects: the
    gateway cancels the gRPC call, the orchestrator cancels the LLM and frees token2wav."""
    # 2000 codes (80 s of audio): far more than can be made before the client leaves
    body = {"input": "A long story.", "voice": "default_female", "response_format": "pcm", **_extra(special, n=2000)}
    llm_cancelled = _metric(triton, "stepaudio2_llm_cancelled_requests_total")
    t2w_cancelled = _metric(triton, "stepaudio2_token2wav_cancelled_streams_total")
    with httpx.Client(base_url=stack.http_url, timeout=120,
                      headers={"Authorization": f"Bearer {stack.api_key}"}) as http:
        with http.stream("POST", "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert first
        # leaving the block closes the connection before the body is complete
    assert _wait_metric(triton, "stepaudio2_token2wav_live_streams", 0) == 0
    assert _wait_metric(triton, "stepaudio2_llm_running_batch", 0) == 0
    # (>=: a cancellation of an earlier test may still be counted meanwhile)
    deadline = time.monotonic() + 60
    while _metric(triton, "stepaudio2_llm_cancelled_requests_total") < llm_cancelled + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(triton, "stepaudio2_llm_cancelled_requests_total") >= llm_cancelled + 1
    assert _metric(triton, "stepaudio2_token2wav_cancelled_streams_total") >= t2w_cancelled + 1
    # the gateway's own view: time to first audio observed, the stream counted as client_left
    text = httpx.get(f"{stack.http_url}/metrics", timeout=10).text
    assert re.search(r'^stepaudio2_gateway_speech_streams_total\{outcome="client_left"\} [1-9]', text, re.M)
    assert re.search(r"^stepaudio2_gateway_speech_first_audio_seconds_count [1-9]", text, re.M)


def test_voices_are_owned_by_the_tenant_that_registered_them(triton, tiny_ckpt):
    """Two tenants share the voice library: each may use every voice, only the owner may
    delete one, and nobody deletes a built-in voice."""
    from pydantic import SecretStr

    keys = SecretStr("alice:alice-key-0123456789,bob:bob-key-0123456789")
    with LocalStack(tiny_ckpt, triton_server=triton, orchestrator_options={"api_keys": keys}) as stack:
        def h(key):
            return {"Authorization": f"Bearer {key}"}

        with httpx.Client(base_url=stack.http_url, timeout=120) as http:
            r = http.post("/v1/audio/voices", headers=h("alice-key-0123456789"),
                          files={"file": ("v.wav", VOICE_WAV.read_bytes())}, data={"voice_id": "alices-voice"})
            assert r.status_code == 201 and r.json()["owner"] == "alice"
            r = http.delete("/v1/audio/voices/alices-voice", headers=h("bob-key-0123456789"))
            assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"
            assert http.get("/v1/audio/voices/alices-voice", headers=h("bob-key-0123456789")).status_code == 200
            r = http.delete("/v1/audio/voices/default_female", headers=h("alice-key-0123456789"))
            assert r.status_code == 400 and "built-in" in r.json()["error"]["message"]
            r = http.delete("/v1/audio/voices/alices-voice", headers=h("alice-key-0123456789"))
            assert r.status_code == 200 and r.json()["deleted"] is True


def test_http_speech_as_server_sent_events(stack, special):
    """stream_format=sse: OpenAI's speech.audio.delta events (base64 audio) then one
    speech.audio.done with usage; the deltas concatenate to the same PCM as the raw body."""
    import base64
    import json

    body = {"input": "Events please.", "voice": "default_male", "response_format": "pcm", **_extra(special, n=60)}
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.http_url, timeout=120, headers=auth) as http:
        raw = http.post("/v1/audio/speech", json=body).content
        r = http.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(block[len("data: "):]) for block in r.text.split("\n\n") if block.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) >= 3
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == 60
    assert events[-1]["usage"]["total_tokens"] == events[-1]["usage"]["input_tokens"] + 60
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert pcm == raw and len(pcm) == 2 * 60 * SAMPLES_PER_CODE
