"""The served stack when Triton goes away and comes back, and when the LLM queue is full:
clear UNAVAILABLE / 503 and RESOURCE_EXHAUSTED / 429 answers, then normal service again."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from stepaudio2.stack import LocalStack
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

WAV = Path(__file__).resolve().parents[2] / "assets" / "demo_digits.wav"


def http_transcribe(stack, timeout=120):
    with WAV.open("rb") as f:
        return httpx.post(f"{stack.http_url}/v1/audio/transcriptions", timeout=timeout,
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          files={"file": (WAV.name, f, "audio/wav")}, data={"model": stack.model_id})


def grpc_transcribe(stack, timeout=120):
    with grpc.insecure_channel(stack.grpc_address) as ch:
        return assistant_pb2_grpc.AssistantStub(ch).Transcribe(
            assistant_pb2.TranscribeRequest(audio=common_pb2.AudioChunk(data=WAV.read_bytes())),
            metadata=[("authorization", f"Bearer {stack.api_key}")], timeout=timeout)


def wait_for(pred, timeout=90.0, every=0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return False


def test_triton_down_then_back(tiny_ckpt, tmp_path):
    from stepaudio2.runtime.model_repo import build_model_repo
    from stepaudio2.runtime.triton import TritonServer, free_port

    repo = build_model_repo(tiny_ckpt, tmp_path / "repo", num_threads=1, max_batch=4)
    server = TritonServer(repo, work_dir=tmp_path / "triton", exit_timeout_s=5, http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        server.wait_ready(180)
        with LocalStack(tiny_ckpt, triton_server=server, orchestrator_options={"max_tokens_per_segment": 8}) as stack:
            ok = http_transcribe(stack)
            assert ok.status_code == 200, ok.text
            want = ok.json()["text"]

            server.stop(grace_s=5)
            r = http_transcribe(stack)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert "unavailable" in err["message"].lower()
            with pytest.raises(grpc.RpcError) as e:
                grpc_transcribe(stack)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "unavailable" in e.value.details().lower()
            assert wait_for(lambda: httpx.get(f"{stack.http_url}/readyz", timeout=5).status_code == 503, 30)

            server.start()  # same ports, same repository
            server.wait_ready(180)
            assert wait_for(lambda: httpx.get(f"{stack.http_url}/readyz", timeout=5).status_code == 200, 60)
            assert wait_for(lambda: http_transcribe(stack).status_code == 200, 60)
            assert http_transcribe(stack).json()["text"] == want
            assert grpc_transcribe(stack).text == want
    finally:
        server.stop(grace_s=5)


def test_llm_queue_full_is_429_and_resource_exhausted(tiny_ckpt, triton_factory):
    server = triton_factory(llm_max_batch=1, llm_max_queue=1, max_batch=8)
    # Long generations (min = max tokens per segment) keep the one slot busy.
    with LocalStack(tiny_ckpt, triton_server=server,
                    orchestrator_options={"max_tokens_per_segment": 300}) as stack:
        results: list[int] = []
        lock = threading.Lock()

        def call():
            r = http_transcribe(stack)
            with lock:
                results.append((r.status_code, r.json() if r.status_code != 200 else None))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(c for c, _ in results)
        assert 200 in codes and 429 in codes, codes
        body = next(b for c, b in results if c == 429)
        assert "queue is full" in body["error"]["message"]
        assert http_transcribe(stack).status_code == 200       # served again once the queue drains
