"""Typed async clients for our Triton models (``audio_encoder``, ``llm``, ``token2wav``,
``voice_encoder``), torch-free.

The services never speak KServe tensors themselves: they call :class:`TritonClients`
with numpy arrays and Python values, and get numpy arrays / token-id lists back. Every
failure leaves this module as a :class:`~stepaudio2.runtime.errors.StepAudio2Error`:

* the server cannot be reached (connection refused, reset, blackholed) ->
  :class:`Unavailable` naming the address, so an operator knows which hop is down;
* a model error whose message starts with one of our codes (``"RESOURCE_EXHAUSTED: "``,
  ``"INVALID_ARGUMENT: "``..., see ``triton_params.error_message``) -> that error class;
* the caller's deadline -> :class:`DeadlineExceeded`; anything else -> :class:`InferenceError`
  with a generic reason (Triton's own text is logged, never sent to our callers).

Cancellation: :meth:`TritonClients.generate` is an async generator over a gRPC stream;
closing it early or cancelling the task that consumes it cancels the gRPC call, which
Triton turns into a cancelled request (the decoupled model stops decoding).
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Mapping, Sequence, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from stepaudio2.runtime.errors import (
    AudioTooLarge,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InferenceError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StepAudio2Error,
    Unavailable,
    UnsupportedAudioFormat,
)

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

ENCODER_MODEL = "audio_encoder"
LLM_MODEL = "llm"
TOKEN2WAV_MODEL = "token2wav"
VOICE_ENCODER_MODEL = "voice_encoder"

# triton_params.error_message's suffix: useful in Triton's log, noise for our callers.
_REQUEST_ID_SUFFIX = re.compile(r"\s*\[request id: [^\]]*\]\s*$")
# Codes our Triton models put in front of their error messages -> the error we raise.
# (Errors inside a decoupled stream carry a message but no gRPC status code.)
_CODE_PREFIX = re.compile(r"\b(INVALID_ARGUMENT|UNSUPPORTED_MEDIA|TOO_LARGE|RESOURCE_EXHAUSTED|UNAVAILABLE|"
                          r"DEADLINE_EXCEEDED|CANCELLED|NOT_FOUND|FAILED_PRECONDITION|INTERNAL): ")
_PREFIX_ERRORS: dict[str, type[StepAudio2Error]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "UNSUPPORTED_MEDIA": UnsupportedAudioFormat,
    "TOO_LARGE": AudioTooLarge,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "NOT_FOUND": NotFound,
    "FAILED_PRECONDITION": FailedPrecondition,
}


@dataclass(frozen=True)
class GenerationParams:
    """Sampling controls of one ``llm`` request (each maps to one optional input tensor).

    ``seed`` and ``stop_ids`` left as None are not sent: the model then picks a random
    seed and stops at ``<|EOT|>``.
    """

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] | None = None
    logit_bias: Mapping[int, float] | None = None
    allowed_token_ids: Sequence[int] | None = None


async def gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Run awaitables concurrently and return their results in order. The first failure
    (or our own cancellation) cancels the others and propagates as itself, not wrapped
    in an ExceptionGroup, so callers can map it like any single error."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished tasks


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc, InferenceServerException) and exc.status():
        # tritonclient keeps the code as "StatusCode.UNAVAILABLE".
        return getattr(grpc.StatusCode, str(exc.status()).rsplit(".", 1)[-1], None)
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or ""
    if isinstance(exc, InferenceServerException):
        return exc.message() or ""
    return str(exc)


# When Triton restarts, gRPC reconnects with exponential backoff (default: up to 120 s),
# during which every call fails fast with UNAVAILABLE. Cap it so the service recovers
# within seconds of the inference server coming back.
RECONNECT_BACKOFF_MS = (100, 2000)  # (initial/min, max)


def _channel_args(keepalive: KeepAliveOptions) -> list[tuple[str, int]]:
    """tritonclient's own channel options (unlimited message size, keepalive) plus a
    capped reconnect backoff."""
    max_msg = 2**31 - 1
    return [
        ("grpc.max_send_message_length", max_msg),
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def _tensor(name: str, value, dtype: str, np_dtype) -> InferInput:
    """An input tensor from a value (array, list, nested lists) as ``np_dtype``."""
    arr = np.ascontiguousarray(value, dtype=np_dtype) if np_dtype is not np.object_ else np.array(value, dtype=np_dtype)
    t = InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def new_stream_id() -> int:
    """A random non-zero 63-bit token2wav sequence id: unique across orchestrator replicas
    sharing one Triton without coordination (collision odds ~n^2 / 2^64)."""
    return secrets.randbits(63) or 1


class TritonClients:
    """Async clients of our models (``audio_encoder``, ``llm``, ``token2wav``,
    ``voice_encoder``) on one Triton server.

    ``url`` is Triton's gRPC address (``host:port``). Use from one event loop; call
    :meth:`close` when done. ``keepalive_s`` > 0 makes the channel ping the server that
    often, so a blackholed connection is noticed; Triton's default server settings count
    pings more often than every 5 minutes as abuse, so raise
    ``--grpc-http2-min-recv-ping-interval-without-data`` on Triton before enabling it.
    """

    def __init__(self, url: str, *, keepalive_s: float = 0.0, encoder_model: str = ENCODER_MODEL,
                 llm_model: str = LLM_MODEL, token2wav_model: str = TOKEN2WAV_MODEL,
                 voice_encoder_model: str = VOICE_ENCODER_MODEL):
        self.url = url
        self.encoder_model = encoder_model
        self.llm_model = llm_model
        self.token2wav_model = token2wav_model
        self.voice_encoder_model = voice_encoder_model
        keepalive = KeepAliveOptions()  # tritonclient's defaults: pings effectively off
        if keepalive_s > 0:
            keepalive = KeepAliveOptions(keepalive_time_ms=int(keepalive_s * 1000),
                                         keepalive_timeout_ms=max(1000, int(keepalive_s * 1000) // 2))
        self._client = triton_aio.InferenceServerClient(url, channel_args=_channel_args(keepalive))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "TritonClients":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- errors ----------------------------------------------------------------------------

    def _error(self, exc: BaseException, model: str) -> StepAudio2Error:
        """Map a transport or model error of a call to ``model`` to our taxonomy."""
        code = _grpc_code(exc)
        msg = _message(exc)
        m = _CODE_PREFIX.search(msg)
        if m and m.group(1) in _PREFIX_ERRORS:
            reason = _REQUEST_ID_SUFFIX.sub("", msg[m.end():]).strip() or msg
            return _PREFIX_ERRORS[m.group(1)](f"model {model!r}: {reason}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"inference server unavailable at {self.url} ({msg or 'no answer'})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"the deadline passed while waiting for model {model!r}")
        if code == grpc.StatusCode.CANCELLED:
            return Cancelled(f"the request to model {model!r} was cancelled")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"model {model!r} is at capacity: {msg}")
        if code == grpc.StatusCode.NOT_FOUND or "unknown model" in msg or "is not ready" in msg:
            return Unavailable(f"model {model!r} is not available on the inference server at {self.url}")
        _LOGGER.error("inference server error from model %r at %s (%s): %s", model, self.url, code, msg)
        return InferenceError(f"the inference server failed on model {model!r}")

    # -- health ----------------------------------------------------------------------------

    async def ready(self, timeout: float = 2.0) -> bool:
        """True when the server and both models are ready; never raises."""
        try:
            if not await self._client.is_server_ready(client_timeout=timeout):
                return False
            for model in (self.encoder_model, self.llm_model):
                if not await self._client.is_model_ready(model, client_timeout=timeout):
                    return False
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any transport failure simply means "not ready"
            _LOGGER.debug("Triton at %s not ready: %s", self.url, exc)
            return False

    # -- audio_encoder ---------------------------------------------------------------------

    async def _encode_one(self, chunk: np.ndarray, timeout: float | None, request_id: str) -> np.ndarray:
        inp = _tensor("WAVEFORM", np.asarray(chunk).reshape(1, -1), "FP32", np.float32)   # [1, N]: the batch dim
        outputs = [InferRequestedOutput("EMBEDS"), InferRequestedOutput("EMBED_LEN")]
        try:
            result = await self._client.infer(self.encoder_model, [inp], outputs=outputs,
                                              request_id=request_id, client_timeout=timeout)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, InferenceServerException) as exc:
            raise self._error(exc, self.encoder_model) from None
        embeds = result.as_numpy("EMBEDS")
        length = result.as_numpy("EMBED_LEN")
        if embeds is None or length is None or embeds.ndim != 3:
            raise self._error(RuntimeError(f"unexpected outputs: EMBEDS {None if embeds is None else embeds.shape}"),
                              self.encoder_model)
        n = int(np.asarray(length).reshape(-1)[0])
        return embeds[0, :n]

    async def encode_audio(self, chunks: Sequence[np.ndarray], *, timeout: float | None = None,
                           request_id: str = "") -> list[np.ndarray]:
        """16 kHz mono chunks (each <= 30 s) -> one ``[N_i, D]`` float32 array per chunk.

        One request per chunk, all in flight at once, so Triton's dynamic batcher can
        batch them (with each other and with other callers' chunks). The first failure
        cancels the rest.
        """
        if not chunks:
            return []
        return await gather_or_cancel([self._encode_one(c, timeout, f"{request_id}-{i}" if request_id else "")
                                       for i, c in enumerate(chunks)])

    # -- llm -------------------------------------------------------------------------------

    def _llm_inputs(self, input_ids: Sequence[int], audio_embeds: Sequence[np.ndarray],
                    params: GenerationParams) -> list[InferInput]:
        inputs = [_tensor("INPUT_IDS", list(input_ids), "INT32", np.int32)]
        embeds = [np.asarray(e, dtype=np.float32) for e in audio_embeds if len(e)]
        if embeds:  # all chunks concatenated, in prompt order: [sum N_i, D]
            inputs.append(_tensor("AUDIO_EMBEDS", np.concatenate(embeds, axis=0), "FP32", np.float32))
        inputs += [
            _tensor("MAX_TOKENS", [params.max_tokens], "INT32", np.int32),
            _tensor("MIN_TOKENS", [params.min_tokens], "INT32", np.int32),
            _tensor("TEMPERATURE", [params.temperature], "FP32", np.float32),
            _tensor("TOP_P", [params.top_p], "FP32", np.float32),
            _tensor("TOP_K", [params.top_k], "INT32", np.int32),
            _tensor("REPETITION_PENALTY", [params.repetition_penalty], "FP32", np.float32),
        ]
        if params.seed is not None:
            inputs.append(_tensor("SEED", [params.seed], "INT64", np.int64))
        if params.stop_ids is not None:
            inputs.append(_tensor("STOP_IDS", list(params.stop_ids), "INT32", np.int32))
        if params.allowed_token_ids:
            inputs.append(_tensor("ALLOWED_TOKEN_IDS", list(params.allowed_token_ids), "INT32", np.int32))
        if params.logit_bias:
            inputs.append(_tensor("LOGIT_BIAS_IDS", list(params.logit_bias), "INT32", np.int32))
            inputs.append(_tensor("LOGIT_BIAS_VALUES", list(params.logit_bias.values()), "FP32", np.float32))
        return inputs

    async def generate(self, input_ids: Sequence[int], audio_embeds: Sequence[np.ndarray],
                       params: GenerationParams, *, timeout: float | None = None,
                       request_id: str = "") -> AsyncIterator[list[int]]:
        """Stream the ``llm`` model's output: yields each response's token ids as a list.

        Ends after the response that carries a ``FINISH_REASON`` (or Triton's final flag).
        ``timeout`` bounds the whole stream. Leaving the loop early, ``aclose()`` or
        cancelling the consumer cancels the Triton request.
        """
        inputs = self._llm_inputs(input_ids, audio_embeds, params)
        outputs = [InferRequestedOutput("TOKEN_IDS"), InferRequestedOutput("FINISH_REASON")]

        async def requests():
            # One request, then half-close: Triton still sends every response of it.
            yield {"model_name": self.llm_model, "inputs": inputs, "outputs": outputs, "request_id": request_id}

        stream = None
        try:
            stream = self._client.stream_infer(requests(), stream_timeout=timeout)
            async for result, error in stream:
                if error is not None:
                    raise self._error(error, self.llm_model)
                tokens = result.as_numpy("TOKEN_IDS")
                if tokens is not None and tokens.size:
                    yield [int(t) for t in tokens.reshape(-1)]
                if self._is_final(result):
                    return
        except asyncio.CancelledError:
            raise
        except StepAudio2Error:
            raise
        except (grpc.RpcError, InferenceServerException) as exc:
            raise self._error(exc, self.llm_model) from None
        finally:
            # Also reached when the consumer stops early (GeneratorExit) or is cancelled:
            # cancelling the call is what tells Triton to stop decoding. No-op once done.
            if stream is not None:
                stream.cancel()

    # -- token2wav ---------------------------------------------------------------------------

    async def token2wav_chunk(self, stream_id: int, tokens: Sequence[int], *, start: bool = False,
                              end: bool = False, voice: str | None = None, seed: int | None = None,
                              cancel: bool = False, timeout: float | None = None,
                              request_id: str = "") -> np.ndarray:
        """One chunk of a token2wav stream -> float32 samples at 24 kHz.

        ``stream_id`` is the Triton sequence id (a non-zero uint64, unique among the open
        streams of that server: use :func:`new_stream_id`). ``start`` opens the stream with
        ``voice`` (and the vocoder ``seed``); ``end`` marks the last chunk; ``cancel`` (sent
        with ``end``) drops the stream. Chunks of one stream must be sent one at a time, in
        order (spec §3.6: 28 tokens, the last 3 re-sent next time; the remainder with end).
        """
        inputs = [_tensor("TOKENS", np.asarray(list(tokens), dtype=np.int32).reshape(1, -1), "INT32", np.int32)]
        if voice is not None:
            inputs.append(_tensor("VOICE", [[voice.encode()]], "BYTES", np.object_))
        if seed is not None:
            inputs.append(_tensor("SEED", [[seed]], "INT64", np.int64))
        if cancel:
            inputs.append(_tensor("CANCEL", [[True]], "BOOL", np.bool_))
        try:
            result = await self._client.infer(self.token2wav_model, inputs, outputs=[InferRequestedOutput("AUDIO")],
                                              sequence_id=stream_id, sequence_start=start,
                                              sequence_end=end or cancel, request_id=request_id,
                                              client_timeout=timeout)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, InferenceServerException) as exc:
            raise self._error(exc, self.token2wav_model) from None
        audio = result.as_numpy("AUDIO")
        if audio is None:
            raise self._error(RuntimeError("no AUDIO output"), self.token2wav_model)
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    async def cancel_token2wav(self, stream_id: int, *, timeout: float = 5.0) -> None:
        """Free a stream's state now (best effort: never raises; the idle timeout is the
        backstop).

        Triton answers CANCELLED to every later request of a sequence one of whose requests
        was cancelled client-side (the model never sees them, so the state would stay until
        the idle timeout): never cancel a chunk call that is in flight; let it finish, then
        call this."""
        try:
            await self.token2wav_chunk(stream_id, [], end=True, cancel=True, timeout=timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            _LOGGER.debug("cancelling token2wav stream %s: %s", stream_id, exc)
            return
        _LOGGER.debug("token2wav stream %s cancelled", stream_id)

    async def warm_voice(self, voice: str, *, timeout: float = 60.0) -> bool:
        """Ask token2wav to compute ``voice``'s prompt prefill now (START + CANCEL, no stream
        kept), so its first stream does not pay for it. Best effort: False on any failure."""
        try:
            await self.token2wav_chunk(new_stream_id(), [], start=True, voice=voice, cancel=True, timeout=timeout)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            _LOGGER.info("warming voice %r in token2wav failed: %s", voice, exc)
            return False

    # -- voice_encoder -----------------------------------------------------------------------

    async def encode_voice(self, audio_file: bytes, *, timeout: float | None = None,
                           request_id: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A reference recording (WAV/FLAC/OGG bytes) -> (prompt tokens int32 [N], prompt mel
        float32 [2N, 80], speaker embedding float32 [192])."""
        inp = _tensor("AUDIO", [bytes(audio_file)], "BYTES", np.object_)
        names = ("PROMPT_TOKENS", "PROMPT_MEL", "SPEAKER_EMBEDDING")
        try:
            result = await self._client.infer(self.voice_encoder_model, [inp],
                                              outputs=[InferRequestedOutput(n) for n in names],
                                              request_id=request_id, client_timeout=timeout)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, InferenceServerException) as exc:
            raise self._error(exc, self.voice_encoder_model) from None
        out = [result.as_numpy(n) for n in names]
        if any(o is None for o in out):
            raise self._error(RuntimeError("missing outputs"), self.voice_encoder_model)
        return out[0].astype(np.int32), out[1].astype(np.float32), out[2].astype(np.float32)

    @staticmethod
    def _is_final(result) -> bool:
        reason = result.as_numpy("FINISH_REASON")
        if reason is not None and reason.size:
            r = reason.reshape(-1)[0]
            if (r.decode() if isinstance(r, bytes) else str(r)):
                return True
        param = result.get_response().parameters.get("triton_final_response")
        return bool(param is not None and param.bool_param)
