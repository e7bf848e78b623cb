"""The public ``stepaudio2.v1.Assistant`` servicer: transcription over Triton.

One Transcribe request runs as:

1. check the request (model id, sampling controls, optional prompt text);
2. decode the audio (WAV/FLAC/OGG sniffed, or raw PCM16 at a given rate) to 16 kHz mono,
   enforcing the byte and duration limits before the expensive work (reliability §7);
3. cut it into <= 25 s segments at quiet points (:mod:`.segmentation`);
4. per segment: the ASR prompt of spec §2.3 (system prompt, the audio in the human turn,
   the request's ``prompt`` text after it), the segment's chunk through ``audio_encoder``,
   then a ``llm`` stream parsed by ``OutputParser``. Segments run concurrently, at most
   ``segment_concurrency`` at a time; the encoder requests of concurrent segments are in
   flight together so Triton batches them;
5. results are delivered in segment order: TranscribeStream sends each segment's text
   deltas, then the Segment, then the final response; Transcribe returns the final one.

The caller's deadline bounds every Triton call (the remaining time is the Triton
timeout); a cancelled call cancels the Triton streams it started. All errors leave as
:class:`StepAudio2Error` and are mapped to gRPC once, in ``grpc_error_boundary``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np

from stepaudio2.model import audio as audio_io
from stepaudio2.model.parser import OutputParser, TextDelta
from stepaudio2.model.prompt import ASR_PROMPT, Prompt, assistant_prefix, audio_item, build_prompt
from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.orchestrator.auth import current_tenant
from stepaudio2.orchestrator.segmentation import segment_audio
from stepaudio2.orchestrator.settings import OrchestratorSettings
from stepaudio2.runtime.errors import (
    AudioTooLarge,
    DeadlineExceeded,
    InvalidArgument,
    InvalidAudio,
    NotFound,
    StepAudio2Error,
)
from stepaudio2.runtime.grpc_errors import grpc_error_boundary, rich_status
from stepaudio2.runtime.triton_client import GenerationParams, TritonClients
from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = audio_io.SAMPLE_RATE
PCM16_MIN_RATE, PCM16_MAX_RATE = 1_000, 384_000
MAX_TEMPERATURE = 2.0
# Leading bytes of each declared container; a different known container is a client mistake.
_CONTAINER_MAGIC = {
    common_pb2.AUDIO_ENCODING_WAV: (b"RIFF", b"RIFX", b"RF64"),
    common_pb2.AUDIO_ENCODING_FLAC: (b"fLaC",),
    common_pb2.AUDIO_ENCODING_OGG: (b"OggS",),
}
_ENCODING_NAME = {common_pb2.AUDIO_ENCODING_WAV: "WAV", common_pb2.AUDIO_ENCODING_FLAC: "FLAC",
                  common_pb2.AUDIO_ENCODING_OGG: "OGG"}


# ---------------------------------------------------------------------------------------
# request pieces (pure functions, unit-testable)
# ---------------------------------------------------------------------------------------
def decode_request_audio(chunk: common_pb2.AudioChunk, *, max_bytes: int, max_seconds: float) -> np.ndarray:
    """An AudioChunk -> 16 kHz mono float32, or InvalidAudio/AudioTooLarge naming the field."""
    data = chunk.data
    if len(data) > max_bytes:
        raise AudioTooLarge(f"audio is {len(data)} bytes, more than the {max_bytes} allowed", field="audio.data")
    enc = chunk.encoding
    try:
        if enc == common_pb2.AUDIO_ENCODING_PCM16:
            return _decode_pcm16(data, chunk.sample_rate_hz, max_seconds)
        if enc not in _CONTAINER_MAGIC and enc != common_pb2.AUDIO_ENCODING_UNSPECIFIED:
            raise InvalidArgument(f"unknown audio encoding {enc}", field="audio.encoding")
        if enc in _CONTAINER_MAGIC and data and not data.startswith(_CONTAINER_MAGIC[enc]):
            other = [name for e, name in _ENCODING_NAME.items() if data.startswith(_CONTAINER_MAGIC[e])]
            if other:
                raise InvalidAudio(f"encoding says {_ENCODING_NAME[enc]} but the data is {other[0]}",
                                   field="audio.encoding")
        return audio_io.load_audio(data, sr=SAMPLE_RATE, max_seconds=max_seconds)
    except StepAudio2Error as err:
        if err.field is None:
            err.field = "audio.data"
        raise


def _decode_pcm16(data: bytes, rate: int, max_seconds: float) -> np.ndarray:
    if not rate:
        raise InvalidAudio("sample_rate_hz is required with PCM16 audio", field="audio.sample_rate_hz")
    if not PCM16_MIN_RATE <= rate <= PCM16_MAX_RATE:
        raise InvalidAudio(f"sample_rate_hz must be in [{PCM16_MIN_RATE}, {PCM16_MAX_RATE}], got {rate}",
                           field="audio.sample_rate_hz")
    if not data:
        raise InvalidAudio("audio input is empty (0 bytes)")
    if len(data) % 2:
        raise InvalidAudio(f"PCM16 data must be whole 2-byte samples, got {len(data)} bytes")
    seconds = len(data) / 2 / rate
    if seconds > max_seconds:
        raise AudioTooLarge(f"audio is {seconds:.2f} s long, longer than the {max_seconds:g} s allowed")
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return audio_io.resample(x, rate, SAMPLE_RATE)


def check_prompt_text(tokenizer: StepAudioTokenizer, text: str, max_chars: int) -> str:
    """The request's extra prompt text; refused when too long or when it would smuggle in
    control tokens (``<|EOT|>``, ``<audio_patch>``...), which would break the turn layout."""
    if not text:
        return ""
    if len(text) > max_chars:
        raise InvalidArgument(f"prompt is {len(text)} characters, more than the {max_chars} allowed", field="prompt")
    special = tokenizer.special_token_ids
    for token_id in tokenizer.encode(text):
        if token_id in special or token_id >= tokenizer.special.audio_start:
            raise InvalidArgument(f"prompt contains the control token {tokenizer.id_to_token(token_id)!r}",
                                  field="prompt")
    return text


def asr_prompt(tokenizer: StepAudioTokenizer, audio: np.ndarray, extra_text: str = "") -> Prompt:
    """The ASR prompt of spec §2.3 for one <= 25 s segment; ``extra_text`` follows the audio
    in the human turn."""
    human = [audio_item(audio)]
    if extra_text:
        human.append({"type": "text", "text": extra_text})
    return build_prompt(tokenizer, [{"role": "system", "content": ASR_PROMPT},
                                    {"role": "human", "content": human},
                                    assistant_prefix(speech_out=False)])


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` (the gateway sets one), else a new id; it names the
    Triton requests of this call, so server logs can be joined up (practice 13)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class _Deadline:
    """The request's time budget: the caller's gRPC deadline, or ``default_s`` without one."""

    MARGIN_S = 0.05  # leave a little to send our answer before the caller gives up

    def __init__(self, context: grpc.aio.ServicerContext, default_s: float):
        remaining = context.time_remaining()
        self.has_caller_deadline = remaining is not None
        budget = remaining - self.MARGIN_S if remaining is not None else default_s
        self._end = time.monotonic() + budget

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline passed before the transcription finished")
        return left


@dataclass
class _Segment:
    index: int
    start: int
    end: int
    prompt: Prompt


# ---------------------------------------------------------------------------------------
# the servicer
# ---------------------------------------------------------------------------------------
class AssistantService(assistant_pb2_grpc.AssistantServicer):
    """Transcribe / TranscribeStream / ListModels over Triton; the rest is UNIMPLEMENTED."""

    def __init__(self, settings: OrchestratorSettings, tokenizer: StepAudioTokenizer, triton: TritonClients):
        self.settings = settings
        self.tokenizer = tokenizer
        self.triton = triton
        self.model_id = settings.served_model_id
        try:
            self.created = int((settings.model_dir / "config.json").stat().st_mtime)
        except OSError:
            self.created = 0

    # -- public RPCs -----------------------------------------------------------------------

    @grpc_error_boundary
    async def Transcribe(self, request: assistant_pb2.TranscribeRequest,
                         context: grpc.aio.ServicerContext) -> assistant_pb2.TranscribeResponse:
        async with contextlib.aclosing(self._transcribe(request, context)) as events:
            async for event in events:
                if event.HasField("done"):
                    return event.done
        raise AssertionError("transcription ended without a final response")  # pragma: no cover

    @grpc_error_boundary
    async def TranscribeStream(self, request: assistant_pb2.TranscribeRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[assistant_pb2.TranscribeEvent]:
        async for event in self._transcribe(request, context):
            yield event

    @grpc_error_boundary
    async def ListModels(self, request: assistant_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> assistant_pb2.ListModelsResponse:
        return assistant_pb2.ListModelsResponse(
            models=[assistant_pb2.ModelInfo(id=self.model_id, owned_by="stepaudio2", created=self.created)])

    # Declared in the contract for the next issues.
    async def Converse(self, request_iterator, context):
        await _unimplemented(context, "Converse (spoken conversation)")

    async def Synthesize(self, request, context):
        await _unimplemented(context, "Synthesize (text to speech)")

    async def CreateSession(self, request, context):
        await _unimplemented(context, "CreateSession")

    async def GetSession(self, request, context):
        await _unimplemented(context, "GetSession")

    async def DeleteSession(self, request, context):
        await _unimplemented(context, "DeleteSession")

    # -- transcription -----------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model and model != self.model_id:
            raise NotFound(f"model {model!r} is not served here (available: {self.model_id!r})", field="model")

    def _params(self, request: assistant_pb2.TranscribeRequest) -> GenerationParams:
        s = self.settings
        max_tokens = request.max_tokens_per_segment or s.max_tokens_per_segment
        if max_tokens > s.max_tokens_per_segment_limit:
            raise InvalidArgument(f"must be at most {s.max_tokens_per_segment_limit}, got {max_tokens}",
                                  field="max_tokens_per_segment")
        t = float(request.temperature)
        if not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise InvalidArgument(f"must be in [0, {MAX_TEMPERATURE:g}], got {t!r}", field="temperature")
        # Stop at <|EOT|> only, as the reference does (spec §2.3).
        return GenerationParams(max_tokens=max_tokens, temperature=t, stop_ids=[self.tokenizer.special.eot])

    def _prepare(self, request: assistant_pb2.TranscribeRequest, extra: str) -> tuple[np.ndarray, list[_Segment]]:
        """Decode, segment and build the prompts (CPU work, run in a worker thread)."""
        s = self.settings
        audio = decode_request_audio(request.audio, max_bytes=s.max_request_bytes, max_seconds=s.max_audio_seconds)
        spans = segment_audio(audio, SAMPLE_RATE)
        segments = [_Segment(i, a, b, asr_prompt(self.tokenizer, audio[a:b], extra)) for i, (a, b) in enumerate(spans)]
        return audio, segments

    async def _transcribe(self, request: assistant_pb2.TranscribeRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[assistant_pb2.TranscribeEvent]:
        self._check_model(request.model)
        params = self._params(request)
        extra = check_prompt_text(self.tokenizer, request.prompt, self.settings.max_prompt_chars)
        deadline = _Deadline(context, self.settings.default_timeout_s)
        rid = request_id_of(context)
        started = time.monotonic()
        audio, segments = await asyncio.to_thread(self._prepare, request, extra)

        # Segments run concurrently; their events come back on one queue tagged with the
        # segment index and are re-ordered here, so the caller sees segment 0's deltas and
        # Segment, then segment 1's, ... The first error ends the request.
        events: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.segment_concurrency)
        tasks = [asyncio.create_task(self._run_segment(seg, params, deadline, slots, events, f"{rid}/{seg.index}"))
                 for seg in segments]
        done: list[assistant_pb2.Segment] = []
        held: dict[int, list] = {seg.index: [] for seg in segments}
        prompt_tokens = sum(len(seg.prompt.input_ids) for seg in segments)
        try:
            while len(done) < len(segments):
                index, kind, payload = await events.get()
                if kind == "error":
                    raise payload
                held[index].append((kind, payload))
                while len(done) < len(segments) and held[len(done)]:
                    kind, payload = held[len(done)].pop(0)
                    if kind == "delta":
                        yield assistant_pb2.TranscribeEvent(
                            delta=assistant_pb2.SegmentDelta(segment_index=len(done), text=payload))
                    else:
                        done.append(payload)
                        yield assistant_pb2.TranscribeEvent(segment=payload)
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished ones; cancels their Triton streams otherwise
            await asyncio.gather(*tasks, return_exceptions=True)

        completion = sum(seg.tokens for seg in done)
        _LOGGER.info("request %s: transcribed %.2f s of audio in %d segment(s), %d+%d tokens, tenant %s, %.2f s",
                     rid, len(audio) / SAMPLE_RATE, len(done), prompt_tokens, completion, current_tenant(),
                     time.monotonic() - started)
        yield assistant_pb2.TranscribeEvent(done=assistant_pb2.TranscribeResponse(
            text=" ".join(seg.text for seg in done if seg.text),
            segments=done,
            duration_s=len(audio) / SAMPLE_RATE,
            model=self.model_id,
            usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                   audio_seconds_milli=int(round(len(audio) * 1000 / SAMPLE_RATE))),
        ))

    async def _run_segment(self, seg: _Segment, params: GenerationParams, deadline: _Deadline,
                           slots: asyncio.Semaphore, events: asyncio.Queue, request_id: str) -> None:
        try:
            async with slots:
                embeds = await self.triton.encode_audio(seg.prompt.audio_chunks, timeout=deadline.remaining(),
                                                        request_id=request_id)
                parser = OutputParser(self.tokenizer)
                texts: list[str] = []
                tokens = 0
                async for ids in self.triton.generate(seg.prompt.input_ids, embeds, params,
                                                      timeout=deadline.remaining(), request_id=request_id):
                    tokens += len(ids)
                    delta = "".join(e.text for i in ids for e in parser.feed(i) if isinstance(e, TextDelta))
                    if delta:
                        texts.append(delta)
                        events.put_nowait((seg.index, "delta", delta))
                tail = "".join(e.text for e in parser.finish() if isinstance(e, TextDelta))
                if tail:
                    texts.append(tail)
                    events.put_nowait((seg.index, "delta", tail))
            events.put_nowait((seg.index, "segment", assistant_pb2.Segment(
                index=seg.index, start_s=seg.start / SAMPLE_RATE, end_s=seg.end / SAMPLE_RATE,
                text="".join(texts), tokens=tokens)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the request's task, which maps it
            events.put_nowait((seg.index, "error", exc))


async def _unimplemented(context: grpc.aio.ServicerContext, what: str) -> None:
    await context.abort_with_status(rich_status(
        grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED",
        f"{what} is declared in stepaudio2.v1 but not served yet; use Transcribe or TranscribeStream"))
