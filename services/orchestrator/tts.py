"""Text to speech pieces (torch-free, unit-testable): the TTS prompt, the 25 + 3 speech-code
chunker of spec §3.6, output audio encoders and a pitch-keeping time stretch.
"""
from __future__ import annotations

import io
import struct
from typing import Literal

import numpy as np

from stepaudio2.model.prompt import (DEFAULT_SYSTEM_PROMPT, TTS_BASE_INSTRUCTION, Prompt, assistant_prefix,
                                     build_base_prompt, build_prompt, tts_base_prompt)
from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.runtime.errors import InvalidArgument
from stepaudio2.v1 import common_pb2

SAMPLE_RATE = 24_000
CHUNK_TOKENS, LOOKAHEAD_TOKENS = 25, 3
PromptStyle = Literal["chat", "base"]


def tts_prompt(tokenizer: StepAudioTokenizer, text: str, style: PromptStyle = "chat") -> Prompt:
    """The prompt that makes the model read ``text`` aloud (spec §2.3).

    ``base``: the Base model's plain TTS prompt (instruction line, text, ``<tts_start>``).
    ``chat``: the chat model's speech-out turn: the default system prompt, the same
    instruction + text as the human turn, the assistant prefilled with ``<tts_start>``
    (eot False), so the reply is the text spoken (TA4-interleaved, spec §2.2).
    """
    if style == "base":
        return build_base_prompt(tokenizer, tts_base_prompt(text))
    if style == "chat":
        return build_prompt(tokenizer, [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "human", "content": TTS_BASE_INSTRUCTION + text},
            assistant_prefix(speech_out=True),
        ])
    raise InvalidArgument(f"unknown TTS prompt style {style!r} (chat | base)", field="tts_prompt_style")


class SpeechChunker:
    """Speech codes -> token2wav chunks by the reference protocol (spec §3.6): once 28
    codes are buffered, send them and keep the last 3; at the end send the rest."""

    def __init__(self, chunk: int = CHUNK_TOKENS, lookahead: int = LOOKAHEAD_TOKENS):
        self.chunk, self.lookahead = chunk, lookahead
        self._buf: list[int] = []
        self.total = 0

    def feed(self, codes) -> list[list[int]]:
        self._buf.extend(int(c) for c in codes)
        self.total += len(codes)
        out = []
        while len(self._buf) >= self.chunk + self.lookahead:
            out.append(self._buf[: self.chunk + self.lookahead])
            self._buf = self._buf[self.chunk:]
        return out

    def finish(self) -> list[int]:
        rest, self._buf = self._buf, []
        return rest


# ----------------------------------------------------------------------------- encoders
OUTPUT_ENCODINGS = {
    common_pb2.AUDIO_ENCODING_UNSPECIFIED: "wav",
    common_pb2.AUDIO_ENCODING_WAV: "wav",
    common_pb2.AUDIO_ENCODING_PCM16: "pcm",
    common_pb2.AUDIO_ENCODING_FLAC: "flac",
    common_pb2.AUDIO_ENCODING_MP3: "mp3",
}
STREAMED = frozenset({"wav", "pcm"})


def to_pcm16(samples: np.ndarray) -> bytes:
    """float [-1, 1] -> int16 little-endian, as the reference's stream output (x 32767)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (x * 32767.0).astype("<i2").tobytes()


def streaming_wav_header(rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header whose sizes say "unknown" (0xFFFFFFFF), so the body
    can be streamed; readers that honour the header read to the end of the stream."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


class AudioEncoder:
    """24 kHz float chunks -> bytes of one output format. ``wav`` and ``pcm`` stream
    (``push`` returns bytes at once); ``flac`` and ``mp3`` are encoded whole by ``finish``
    (their encoders need the whole signal to write a correct file)."""

    def __init__(self, fmt: str, rate: int = SAMPLE_RATE):
        if fmt not in ("wav", "pcm", "flac", "mp3"):
            raise InvalidArgument(f"unsupported output format {fmt!r} (wav, pcm, flac, mp3)", field="response_format")
        self.fmt, self.rate = fmt, rate
        self.streamed = fmt in STREAMED
        self._held: list[np.ndarray] = []
        self._started = False

    def push(self, samples: np.ndarray) -> bytes:
        if not self.streamed:
            self._held.append(np.asarray(samples, dtype=np.float32))
            return b""
        head = b""
        if self.fmt == "wav" and not self._started:
            head = streaming_wav_header(self.rate)
        self._started = True
        return head + to_pcm16(samples)

    def finish(self) -> bytes:
        if self.streamed:
            return b"" if self._started or self.fmt == "pcm" else streaming_wav_header(self.rate)
        import soundfile as sf

        x = np.concatenate(self._held) if self._held else np.zeros(0, dtype=np.float32)
        if x.size == 0:
            x = np.zeros(1, dtype=np.float32)     # no speech: one silent sample, still a valid file
        buf = io.BytesIO()
        if self.fmt == "flac":
            sf.write(buf, x, self.rate, format="FLAC", subtype="PCM_16")
        else:
            sf.write(buf, x, self.rate, format="MP3", subtype="MPEG_LAYER_III")
        return buf.getvalue()


# ----------------------------------------------------------------------------- speed
MIN_SPEED, MAX_SPEED = 0.25, 4.0


def check_speed(speed: float) -> float:
    """0 (unset) -> 1.0; otherwise must lie in [0.25, 4.0] (OpenAI's range)."""
    s = float(speed)
    if s == 0.0:
        return 1.0
    if not (MIN_SPEED <= s <= MAX_SPEED):
        raise InvalidArgument(f"must be in [{MIN_SPEED}, {MAX_SPEED}], got {speed!r}", field="speed")
    return s


def time_stretch(x: np.ndarray, speed: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """WSOLA time-scale modification: ``speed`` > 1 is faster (shorter), pitch unchanged.

    Frames of 40 ms are overlap-added with a Hann window at a fixed output hop; each next
    input frame is searched within +-10 ms of its nominal position for the offset most
    similar (cross-correlation) to the natural continuation of the previous frame."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if speed == 1.0 or x.size == 0:
        return x
    n = int(0.040 * rate)
    hop_out = n // 2
    hop_in = hop_out * speed
    tol = int(0.010 * rate)
    window = np.hanning(n).astype(np.float32)
    out_len = int(np.ceil(x.size / speed)) + n
    out = np.zeros(out_len + n, dtype=np.float32)
    norm = np.zeros_like(out)
    pad = np.concatenate([np.zeros(tol, np.float32), x, np.zeros(n + tol + int(hop_in) + 1, np.float32)])
    prev = tol                    # start of the previous chosen frame in `pad`
    k = 0
    while True:
        nominal = tol + int(round(k * hop_in))
        if nominal - tol >= x.size:
            break
        if k == 0:
            pos = nominal
        else:
            target = pad[prev + hop_out: prev + hop_out + n]          # natural continuation
            lo, hi = max(0, nominal - tol), nominal + tol
            seg = pad[lo: hi + n]
            if seg.size < n + 1 or target.size < n:
                pos = nominal
            else:
                corr = np.correlate(seg, target, mode="valid")
                pos = lo + int(np.argmax(corr))
        o = k * hop_out
        out[o: o + n] += pad[pos: pos + n] * window
        norm[o: o + n] += window
        prev = pos
        k += 1
    keep = int(round(x.size / speed))
    norm[norm < 1e-3] = 1.0
    return (out / norm)[:keep].astype(np.float32)
