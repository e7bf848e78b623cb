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
import hashlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np

from stepaudio2.model import audio as audio_io
from stepaudio2.model.parser import AudioCodes, OutputParser, TextDelta
from stepaudio2.model.prompt import ASR_PROMPT, Prompt, assistant_prefix, audio_item, build_prompt
from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.orchestrator.auth import current_tenant
from stepaudio2.orchestrator.segmentation import segment_audio
from stepaudio2.orchestrator.settings import OrchestratorSettings
from stepaudio2.orchestrator.tts import (OUTPUT_ENCODINGS, SAMPLE_RATE as TTS_RATE, AudioEncoder, SpeechChunker,
                                         check_speed, time_stretch, tts_prompt)
from stepaudio2.runtime.errors import (
    AlreadyExists,
    AudioTooLarge,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    InvalidAudio,
    NotFound,
    PermissionDenied,
    StepAudio2Error,
)
from stepaudio2.runtime.grpc_errors import grpc_error_boundary, rich_status
from stepaudio2.runtime.triton_client import GenerationParams, TritonClients, new_stream_id
from stepaudio2.runtime.voice_store import (BUILTIN_VOICES, Voice, VoiceStore, VoiceStoreSettings, check_voice_id,
                                            open_voice_store)
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
            raise DeadlineExceeded("the deadline passed before the request finished")
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
def open_orchestrator_voices(settings: OrchestratorSettings) -> VoiceStore:
    """The voice library: ``settings.voices_dir`` when set, else ``STEPAUDIO2_VOICES_*``.
    Not cached here: the orchestrator lists, checks and writes; token2wav caches reads."""
    overrides: dict = {"cache_items": 0}
    if settings.voices_dir is not None:
        overrides["local_folder"] = settings.voices_dir
    return open_voice_store(VoiceStoreSettings(**overrides))


def sampling_params(opts: common_pb2.SamplingOptions, *, default_max: int, limit: int, stop_ids: list[int],
                    defaults: dict, vocab_size: int | None = None) -> GenerationParams:
    """A request's SamplingOptions -> GenerationParams, unset fields from ``defaults``.
    Range checks here name the field; the rest (ids within the vocabulary...) the model checks."""
    def pick(name):
        return getattr(opts, name) if opts.HasField(name) else defaults.get(name)

    max_tokens = opts.max_tokens or default_max
    if max_tokens > limit:
        raise InvalidArgument(f"must be at most {limit}, got {max_tokens}", field="sampling.max_tokens")
    if opts.min_tokens > max_tokens:
        raise InvalidArgument(f"must be at most max_tokens ({max_tokens}), got {opts.min_tokens}",
                              field="sampling.min_tokens")
    t = float(pick("temperature") or 0.0)
    if not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
        raise InvalidArgument(f"must be in [0, {MAX_TEMPERATURE:g}], got {t!r}", field="sampling.temperature")
    top_p = float(pick("top_p") if pick("top_p") is not None else 1.0)
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"must be in (0, 1], got {top_p!r}", field="sampling.top_p")
    rep = float(pick("repetition_penalty") if pick("repetition_penalty") is not None else 1.0)
    if not (math.isfinite(rep) and rep > 0):
        raise InvalidArgument(f"must be > 0, got {rep!r}", field="sampling.repetition_penalty")
    if vocab_size is not None:
        for name, ids in (("allowed_token_ids", opts.allowed_token_ids), ("logit_bias", opts.logit_bias.keys())):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                                      field=f"sampling.{name}")
    for k, v in opts.logit_bias.items():
        if not math.isfinite(v) or abs(v) > 100:
            raise InvalidArgument(f"bias of token {k} must be in [-100, 100], got {v!r}", field="sampling.logit_bias")
    return GenerationParams(max_tokens=max_tokens, min_tokens=opts.min_tokens, temperature=t, top_p=top_p,
                            top_k=int(pick("top_k") or 0), repetition_penalty=rep,
                            seed=int(opts.seed) if opts.HasField("seed") else None, stop_ids=stop_ids,
                            logit_bias=dict(opts.logit_bias) or None,
                            allowed_token_ids=list(opts.allowed_token_ids) or None)


def voice_info(voice: Voice) -> assistant_pb2.VoiceInfo:
    return assistant_pb2.VoiceInfo(voice_id=voice.voice_id, name=voice.name, description=voice.description,
                                   created=voice.created, prompt_tokens=int(voice.prompt_tokens.shape[0]),
                                   builtin=voice.voice_id in BUILTIN_VOICES, owner=voice.owner)


# Conversation-style sampling for speech (spec §2.4).
TTS_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05}


class AssistantService(assistant_pb2_grpc.AssistantServicer):
    """Transcribe(Stream), Synthesize, the voice library and ListModels over Triton;
    Converse and sessions are UNIMPLEMENTED."""

    def __init__(self, settings: OrchestratorSettings, tokenizer: StepAudioTokenizer, triton: TritonClients,
                 voices: VoiceStore | None = None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.triton = triton
        self.voices = voices if voices is not None else open_orchestrator_voices(settings)
        # Text to speech needs the checkpoint's token2wav/ (an ASR-only checkpoint has none).
        from stepaudio2.runtime.model_repo import checkpoint_models

        models = checkpoint_models(settings.model_dir)
        self._no_speech = models["token2wav"]
        self._no_voice_encoder = models["voice_encoder"]
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

    @grpc_error_boundary
    async def Synthesize(self, request: assistant_pb2.SynthesizeRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[assistant_pb2.SynthesizeEvent]:
        async for event in self._synthesize(request, context):
            yield event

    @grpc_error_boundary
    async def RegisterVoice(self, request: assistant_pb2.RegisterVoiceRequest,
                            context: grpc.aio.ServicerContext) -> assistant_pb2.VoiceInfo:
        return await self._register_voice(request, context)

    @grpc_error_boundary
    async def ListVoices(self, request: assistant_pb2.ListVoicesRequest,
                         context: grpc.aio.ServicerContext) -> assistant_pb2.ListVoicesResponse:
        def load():
            out = []
            for vid in self.voices.list():
                try:
                    out.append(voice_info(self.voices.get(vid)))
                except NotFound:     # deleted meanwhile
                    continue
            return out
        return assistant_pb2.ListVoicesResponse(voices=await asyncio.to_thread(load))

    @grpc_error_boundary
    async def GetVoice(self, request: assistant_pb2.GetVoiceRequest,
                       context: grpc.aio.ServicerContext) -> assistant_pb2.VoiceInfo:
        vid = check_voice_id(request.voice_id)
        return voice_info(await asyncio.to_thread(self.voices.get, vid))

    @grpc_error_boundary
    async def DeleteVoice(self, request: assistant_pb2.DeleteVoiceRequest,
                          context: grpc.aio.ServicerContext) -> assistant_pb2.DeleteVoiceResponse:
        vid = check_voice_id(request.voice_id)
        if vid in BUILTIN_VOICES:
            raise FailedPrecondition(f"{vid!r} is a built-in voice and cannot be deleted", field="voice_id")
        voice = await asyncio.to_thread(self.voices.get, vid)          # NotFound first
        tenant = current_tenant()
        if voice.owner and tenant is not None and voice.owner != tenant:
            raise PermissionDenied(f"voice {vid!r} belongs to another tenant; only its owner may delete it",
                                   field="voice_id")
        await asyncio.to_thread(self.voices.delete, vid)
        _LOGGER.info("voice %r deleted by tenant %s", vid, tenant)
        return assistant_pb2.DeleteVoiceResponse()

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

        async def cancel_segments() -> None:      # also when the client leaves mid-stream
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        on_rpc_end(context, cancel_segments)
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


    # -- voices ------------------------------------------------------------------------------

    async def _register_voice(self, request: assistant_pb2.RegisterVoiceRequest,
                              context: grpc.aio.ServicerContext) -> assistant_pb2.VoiceInfo:
        s = self.settings
        if self._no_voice_encoder:
            raise FailedPrecondition(f"this deployment cannot make voices: {self._no_voice_encoder}")
        data = request.audio.data
        if not data:
            raise InvalidAudio("the reference recording is empty (0 bytes)", field="audio.data")
        if len(data) > s.max_voice_bytes:
            raise AudioTooLarge(f"the reference recording is {len(data)} bytes, more than the {s.max_voice_bytes} "
                                f"allowed", field="audio.data")
        if request.audio.encoding == common_pb2.AUDIO_ENCODING_PCM16:
            raise InvalidAudio("register a voice from a WAV, FLAC or OGG file, not raw PCM16", field="audio.encoding")
        if len(request.name) > 200 or len(request.description) > 2000:
            raise InvalidArgument("name is limited to 200 and description to 2000 characters", field="name")
        if request.voice_id:
            vid = check_voice_id(request.voice_id)
        else:
            vid = "voice-" + hashlib.sha256(data).hexdigest()[:16]
        if vid in BUILTIN_VOICES or await asyncio.to_thread(self.voices.exists, vid):
            raise AlreadyExists(f"voice {vid!r} already exists: delete it first or pick another id", field="voice_id")
        deadline = _Deadline(context, s.default_timeout_s)
        try:
            tokens, mel, spk = await self.triton.encode_voice(data, timeout=deadline.remaining(),
                                                              request_id=request_id_of(context))
        except InvalidArgument as err:       # the clip itself is bad: name the field
            err.field = err.field or "audio.data"
            raise
        voice = Voice(voice_id=vid, name=request.name or vid, description=request.description,
                      prompt_tokens=tokens, prompt_mel=mel, speaker_embedding=spk, owner=current_tenant() or "")
        await asyncio.to_thread(self.voices.put, voice, bytes(data))
        _LOGGER.info("voice %r registered by tenant %s (%d prompt tokens)", vid, current_tenant(), len(tokens))
        # token2wav computes the voice's prompt pass now rather than in its first stream's batch
        try:
            budget = min(60.0, deadline.remaining())
        except DeadlineExceeded:
            budget = 0.0
        if budget >= 1.0:
            await self.triton.warm_voice(vid, timeout=budget)
        return voice_info(voice)

    # -- text to speech ----------------------------------------------------------------------

    def _check_tts_text(self, text: str) -> str:
        if not text.strip():
            raise InvalidArgument("text is empty: nothing to say", field="text")
        if len(text) > self.settings.max_tts_chars:
            raise InvalidArgument(f"text is {len(text)} characters, more than the {self.settings.max_tts_chars} "
                                  f"allowed", field="text")
        special = self.tokenizer.special_token_ids
        for token_id in self.tokenizer.encode(text):
            if token_id in special or token_id >= self.tokenizer.special.audio_start:
                raise InvalidArgument(f"text contains the control token {self.tokenizer.id_to_token(token_id)!r}",
                                      field="text")
        return text

    async def _synthesize(self, request: assistant_pb2.SynthesizeRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[assistant_pb2.SynthesizeEvent]:
        s = self.settings
        self._check_model(request.model)
        if self._no_speech:
            raise FailedPrecondition(f"this deployment does not speak: {self._no_speech}")
        text = self._check_tts_text(request.text)
        voice = check_voice_id(request.voice or s.default_voice)
        if request.encoding not in OUTPUT_ENCODINGS:
            raise InvalidArgument(f"unsupported output encoding {request.encoding} (WAV, PCM16, FLAC, MP3)",
                                  field="encoding")
        fmt = OUTPUT_ENCODINGS[request.encoding]
        speed = check_speed(request.speed)
        sp = self.tokenizer.special
        params = sampling_params(request.sampling, default_max=s.tts_max_tokens, limit=s.tts_max_tokens_limit,
                                 stop_ids=[sp.eot, sp.tts_end], defaults=TTS_SAMPLING_DEFAULTS,
                                 vocab_size=self.tokenizer.vocab_size)
        if not await asyncio.to_thread(self.voices.exists, voice):
            raise NotFound(f"voice {voice!r} does not exist (see ListVoices)", field="voice")
        prompt = tts_prompt(self.tokenizer, text, s.tts_prompt_style)
        deadline = _Deadline(context, s.default_timeout_s)
        rid = request_id_of(context)
        started = time.monotonic()
        encoder = AudioEncoder(fmt)
        out_encoding = request.encoding or common_pb2.AUDIO_ENCODING_WAV
        stretch = speed != 1.0
        held: list[np.ndarray] = []          # whole utterance when time-stretching
        seed = params.seed

        # The LLM streams codes into `chunks` (a task of its own, so decoding goes on while
        # token2wav works); this loop sends each chunk to token2wav in order.
        chunks: asyncio.Queue = asyncio.Queue()
        usage = {"completion": 0}

        async def decode() -> None:
            try:
                parser = OutputParser(self.tokenizer, in_tts=True)
                chunker = SpeechChunker()
                async for ids in self.triton.generate(prompt.input_ids, [], params, timeout=deadline.remaining(),
                                                      request_id=rid):
                    usage["completion"] += len(ids)
                    codes = [c for e in parser.feed_many(ids) if isinstance(e, AudioCodes) for c in e.codes]
                    for chunk in chunker.feed(codes):
                        chunks.put_nowait(("chunk", chunk))
                parser.finish()
                chunks.put_nowait(("last", chunker.finish()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the request's loop
                chunks.put_nowait(("error", exc))

        stream_id = new_stream_id()
        opened = closed = False
        task = asyncio.create_task(decode())
        total_codes = samples_out = 0

        async def release() -> None:
            """Stop decoding and free the token2wav stream (idempotent). Runs from the
            generator's finally AND when the RPC ends: a client that cancels while this
            generator is suspended at a yield leaves it to garbage collection, which must
            not decide when Triton's state is freed."""
            nonlocal closed
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if inflight is not None:
                # A token2wav call is never cancelled (that would poison its Triton sequence:
                # see TritonClients.cancel_token2wav); wait for it, bounded by its own timeout.
                await asyncio.wait({inflight})
                if not inflight.cancelled():
                    inflight.exception()            # retrieved: no "never retrieved" warning
            if opening and not closed:
                closed = True
                _LOGGER.debug("request %s: freeing token2wav stream %d", rid, stream_id)
                # Its own task: the request's task may be cancelled again while it waits
                # (seen: a client cancel reaches the handler twice), which must not
                # cancel the message that frees Triton's state.
                await asyncio.shield(spawn(self.triton.cancel_token2wav(stream_id)))

        opening = False
        inflight: asyncio.Task | None = None
        on_rpc_end(context, release)
        try:
            while not closed:
                kind, payload = await chunks.get()
                if kind == "error":
                    raise payload
                last = kind == "last"
                if last and not opened and not payload:
                    closed = True                 # the model said nothing speakable
                    break
                opening = True                    # from here on the stream may exist in Triton
                inflight = spawn(self.triton.token2wav_chunk(
                    stream_id, payload, start=not opened, end=last, voice=None if opened else voice,
                    seed=None if opened else seed, timeout=deadline.remaining(), request_id=rid))
                audio = await asyncio.shield(inflight)
                opened, closed = True, last
                new_codes = len(payload) - (0 if total_codes == 0 else 3) if payload else 0
                total_codes += max(0, new_codes)
                samples_out += audio.size
                if stretch:
                    held.append(audio)
                    continue
                data = encoder.push(audio)
                if data:
                    yield assistant_pb2.SynthesizeEvent(
                        audio=common_pb2.AudioChunk(data=data, encoding=out_encoding, sample_rate_hz=TTS_RATE),
                        speech_tokens=max(0, new_codes))
        finally:
            await release()
        tail = b""
        if stretch:       # time-stretching needs the whole utterance: one audio event at the end
            whole = await asyncio.to_thread(time_stretch, np.concatenate(held) if held else np.zeros(0, np.float32),
                                            speed)
            samples_out = whole.size
            tail = encoder.push(whole)
        tail += encoder.finish()
        _LOGGER.info("request %s: synthesized %.2f s (%d speech codes, %d tokens) in voice %r, tenant %s, %.2f s",
                     rid, samples_out / TTS_RATE, total_codes, usage["completion"], voice, current_tenant(),
                     time.monotonic() - started)
        yield assistant_pb2.SynthesizeEvent(
            audio=common_pb2.AudioChunk(data=tail, encoding=out_encoding, sample_rate_hz=TTS_RATE),
            usage=common_pb2.Usage(prompt_tokens=len(prompt.input_ids), completion_tokens=usage["completion"],
                                   audio_seconds_milli=int(round(samples_out * 1000 / TTS_RATE))))


_CLEANUPS: set = set()


def spawn(coro) -> asyncio.Task:
    """A task kept alive (strong reference) until it is done, whoever awaits it."""
    t = asyncio.get_running_loop().create_task(coro)
    _CLEANUPS.add(t)
    t.add_done_callback(_CLEANUPS.discard)
    return t


def on_rpc_end(context: grpc.aio.ServicerContext, cleanup) -> None:
    """Run ``await cleanup()`` when the RPC ends (finished, failed or cancelled by the
    client), on the server's loop. ``cleanup`` must be idempotent."""
    loop = asyncio.get_running_loop()

    def done(_ctx) -> None:
        loop.call_soon_threadsafe(lambda: spawn(cleanup()))

    try:
        context.add_done_callback(done)
    except (AttributeError, NotImplementedError):   # a context without callbacks (unit tests)
        pass


async def _unimplemented(context: grpc.aio.ServicerContext, what: str) -> None:
    await context.abort_with_status(rich_status(
        grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED",
        f"{what} is declared in stepaudio2.v1 but not served yet; use Transcribe, TranscribeStream or Synthesize"))
