"""ASR evaluation through the served stack (issue 5): the same data sets and WER as
``stepaudio2.model.eval_asr``, but every clip goes through the public gRPC API
(``Assistant.Transcribe``) or the OpenAI-compatible HTTP endpoint, as a user's would.
Torch-free (a client of the stack)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stepaudio2.model.eval_asr import evaluate_with


def grpc_transcriber(address: str, api_key: str, timeout: float = 120.0):
    """``path -> text`` over ``stepaudio2.v1.Assistant/Transcribe``."""
    import grpc

    from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    channel = grpc.insecure_channel(address)
    stub = assistant_pb2_grpc.AssistantStub(channel)

    def run(path: Path) -> str:
        req = assistant_pb2.TranscribeRequest(audio=common_pb2.AudioChunk(data=Path(path).read_bytes()))
        return stub.Transcribe(req, metadata=[("authorization", f"Bearer {api_key}")], timeout=timeout).text

    run.close = channel.close
    return run


def http_transcriber(base_url: str, api_key: str, model: str, timeout: float = 120.0):
    """``path -> text`` over ``POST /v1/audio/transcriptions`` with the official OpenAI SDK."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def run(path: Path) -> str:
        with open(path, "rb") as f:
            return client.audio.transcriptions.create(model=model, file=f).text

    run.close = client.close
    return run


def evaluate_served(data_dir: str | Path, *, grpc_address: str | None = None, http_url: str | None = None,
                    api_key: str, model: str | None = None) -> dict[str, Any]:
    """WER over a running stack, through gRPC (``grpc_address``) or HTTP (``http_url``)."""
    if (grpc_address is None) == (http_url is None):
        raise ValueError("give exactly one of grpc_address and http_url")
    run = (grpc_transcriber(grpc_address, api_key) if grpc_address else
           http_transcriber(http_url, api_key, model or ""))
    try:
        return evaluate_with(run, data_dir)
    finally:
        run.close()
