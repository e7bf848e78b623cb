"""The shipped demo checkpoint through the served stack (issue 5): transcripts over gRPC
and over HTTP (the OpenAI SDK, the OpenAI request shape) match the references (WER <= 2%
on the held-out set, the unseen voice included) and match in-process output exactly.
A bug shared by served and in-process paths (wrong splice, wrong mel, lost chunk) would
show here as a WER rise, which random weights could never reveal."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio2.evaluation import evaluate_served
from stepaudio2.model.eval_asr import evaluate
from stepaudio2.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "assets" / "demo-checkpoint"
EVAL = ROOT / "assets" / "eval-digits"
UNSEEN = "en-us+f4"


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    with LocalStack(CKPT, repo_options={"num_threads": 1}, voices_dir=tmp_path_factory.mktemp("voices"),
                    orchestrator_options={"max_tokens_per_segment": 32}) as stack:
        yield stack


def test_asr_only_checkpoint_refuses_speech_clearly(demo_stack):
    """The demo checkpoint has no token2wav/: Triton serves no token2wav, and text to speech
    and voice registration say why (FAILED_PRECONDITION / 400) instead of failing deep."""
    import grpc
    import httpx

    from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    assert not demo_stack.serves_speech
    md = (("authorization", f"Bearer {demo_stack.api_key}"),)
    with grpc.insecure_channel(demo_stack.grpc_address) as ch:
        stub = assistant_pb2_grpc.AssistantStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Synthesize(assistant_pb2.SynthesizeRequest(text="hello"), metadata=md, timeout=30))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "token2wav" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterVoice(assistant_pb2.RegisterVoiceRequest(
                voice_id="v", audio=common_pb2.AudioChunk(data=(ROOT / "assets" / "voices" / "default_male.wav")
                                                          .read_bytes())), metadata=md, timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    r = httpx.post(f"{demo_stack.http_url}/v1/audio/speech", json={"input": "hello", "voice": "default_male"},
                   headers={"Authorization": f"Bearer {demo_stack.api_key}"}, timeout=30)
    assert r.status_code == 400 and "token2wav" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def in_process():
    return evaluate(CKPT, EVAL, max_new_tokens=32, threads=1)


def test_grpc_matches_references_and_in_process(demo_stack, in_process):
    served = evaluate_served(EVAL, grpc_address=demo_stack.grpc_address, api_key=demo_stack.api_key)
    assert served["n"] >= 50
    assert served["wer"] <= 0.02
    assert served["per_voice"][UNSEEN]["n"] >= 15 and served["per_voice"][UNSEEN]["wer"] <= 0.02
    assert [r["hyp"] for r in served["rows"]] == [r["hyp"] for r in in_process["rows"]]


def test_http_openai_sdk_matches_references_and_in_process(demo_stack, in_process):
    served = evaluate_served(EVAL, http_url=demo_stack.http_url, api_key=demo_stack.api_key,
                             model=demo_stack.model_id)
    assert served["wer"] <= 0.02
    assert served["per_voice"][UNSEEN]["wer"] <= 0.02
    assert [r["hyp"] for r in served["rows"]] == [r["hyp"] for r in in_process["rows"]]


def test_demo_wav_is_transcribed_exactly(demo_stack):
    from stepaudio2.evaluation import grpc_transcriber

    run = grpc_transcriber(demo_stack.grpc_address, demo_stack.api_key)
    try:
        assert run(ROOT / "assets" / "demo_digits.wav") == (ROOT / "assets" / "demo_digits.txt").read_text().strip()
    finally:
        run.close()
