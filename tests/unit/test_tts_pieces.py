"""The torch-free TTS pieces of the orchestrator: the TTS prompt, the 25 + 3 speech-code
chunker, the output audio encoders, the speed check and the pitch-keeping time stretch."""
import io
import struct

import numpy as np
import pytest
import soundfile as sf

from stepaudio2.orchestrator.tts import (SAMPLE_RATE, AudioEncoder, SpeechChunker, check_speed, streaming_wav_header,
                                         time_stretch, to_pcm16, tts_prompt)
from stepaudio2.runtime.errors import InvalidArgument

CHUNK, LOOKAHEAD = 25, 3


# ----------------------------------------------------------------------------- chunker
def reconstruct(chunks: list[list[int]], rest: list[int]) -> list[int]:
    """The code sequence the protocol sends: each next chunk (and the remainder) starts with
    the previous chunk's last 3 codes."""
    if not chunks:
        return list(rest)
    seq = list(chunks[0])
    for prev, c in zip(chunks, chunks[1:] + [rest]):
        assert c[:LOOKAHEAD] == prev[-LOOKAHEAD:], "consecutive chunks must overlap by the 3 lookahead codes"
        seq += c[LOOKAHEAD:]
    return seq


@pytest.mark.parametrize("n", list(range(1, 101)))
def test_chunker_random_splits(n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 6561, n).tolist()
    ch = SpeechChunker()
    chunks, at = [], 0
    while at < n:
        k = int(rng.integers(0, 12))                 # includes empty feeds
        chunks += ch.feed(np.asarray(codes[at: at + k]) if k % 2 else codes[at: at + k])
        at += k
    rest = ch.finish()
    assert all(len(c) == CHUNK + LOOKAHEAD for c in chunks)
    assert all(isinstance(v, int) for c in chunks for v in c)
    want_chunks = 0 if n < CHUNK + LOOKAHEAD else (n - LOOKAHEAD) // CHUNK
    assert len(chunks) == want_chunks
    assert len(rest) == n - CHUNK * len(chunks)
    assert LOOKAHEAD <= len(rest) < CHUNK + LOOKAHEAD if chunks else len(rest) == n
    assert reconstruct(chunks, rest) == codes
    assert ch.total == n
    assert ch.finish() == []                          # the buffer was handed out


def test_chunker_one_big_feed_equals_code_by_code():
    codes = list(range(1000, 1100))
    a = SpeechChunker()
    big = a.feed(codes)
    b = SpeechChunker()
    small = [c for code in codes for c in b.feed([code])]
    assert big == small and a.finish() == b.finish()
    assert big[0] == codes[:28] and big[1] == codes[25:53]


def test_chunker_other_sizes():
    ch = SpeechChunker(chunk=4, lookahead=1)
    assert ch.feed(range(4)) == []
    assert ch.feed([4, 5, 6]) == [[0, 1, 2, 3, 4]]
    assert ch.finish() == [4, 5, 6]


# ----------------------------------------------------------------------------- prompt
@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    from stepaudio2.model.tokenizer import StepAudioTokenizer

    return StepAudioTokenizer.from_dir(tiny_ckpt)


@pytest.mark.parametrize("style", ["chat", "base"])
def test_tts_prompt(tokenizer, style):
    text = "Hello there, 你好世界."
    p = tts_prompt(tokenizer, text, style)
    tts_start = tokenizer.token_to_id("<tts_start>")
    assert tts_start is not None
    assert p.input_ids[-1] == tts_start
    assert p.input_ids.count(tts_start) == 1
    decoded = tokenizer.decode(p.input_ids)
    assert text in decoded
    assert decoded.endswith(text + "<tts_start>") if style == "base" else decoded.endswith("<tts_start>")
    assert p.audio_chunks == [] and p.patch_counts == []
    if style == "chat":
        human, assistant = decoded.index("<|BOT|>human\n"), decoded.index("<|BOT|>assistant\n")
        assert decoded.startswith("<|BOT|>system\n")
        assert human < decoded.index(text) < assistant
        assert decoded.endswith("<|BOT|>assistant\n<tts_start>")      # prefilled, no EOT after it
    else:
        assert "<|BOT|>" not in decoded


def test_tts_prompt_styles_differ(tokenizer):
    assert tts_prompt(tokenizer, "abc", "chat").input_ids != tts_prompt(tokenizer, "abc", "base").input_ids
    assert tts_prompt(tokenizer, "abc").input_ids == tts_prompt(tokenizer, "abc", "chat").input_ids


@pytest.mark.parametrize("style", ["", "Chat", "instruct", None])
def test_tts_prompt_unknown_style(tokenizer, style):
    with pytest.raises(InvalidArgument) as e:
        tts_prompt(tokenizer, "abc", style)
    assert e.value.field == "tts_prompt_style"


# ----------------------------------------------------------------------------- encoders
def sine(n: int, f: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * f * np.arange(n) / SAMPLE_RATE)).astype(np.float32)


def test_to_pcm16():
    x = np.array([0.0, 1.0, -1.0, 0.5, 2.0, -3.0], dtype=np.float32)
    got = np.frombuffer(to_pcm16(x), dtype="<i2")
    assert got.tolist() == [0, 32767, -32767, 16383, 32767, -32767]


def test_streaming_wav_header_fields():
    h = streaming_wav_header()
    assert len(h) == 44
    riff, riff_size, wave, fmt, fmt_size, tag, ch, rate, byte_rate, align, bits, data, data_size = \
        struct.unpack("<4sI4s4sIHHIIHH4sI", h)
    assert (riff, wave, fmt, data) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert riff_size == data_size == 0xFFFFFFFF
    assert (fmt_size, tag, ch, rate, byte_rate, align, bits) == (16, 1, 1, 24000, 48000, 2, 16)


def test_wav_encoder_streams():
    x = sine(5000)
    enc = AudioEncoder("wav")
    assert enc.streamed
    parts = [enc.push(x[:1234]), enc.push(x[1234:1234]), enc.push(x[1234:])]
    tail = enc.finish()
    assert parts[0][:44] == streaming_wav_header() and tail == b""
    assert parts[1] == b""                               # an empty chunk after the header adds nothing
    body = b"".join(parts)[44:]
    assert body == to_pcm16(x)
    # libsndfile honours the "unknown size" header and reads to the end
    y, sr = sf.read(io.BytesIO(b"".join(parts)), dtype="int16")
    assert sr == SAMPLE_RATE and np.array_equal(y, np.frombuffer(to_pcm16(x), "<i2"))


def test_wav_encoder_with_no_audio_still_writes_a_header():
    assert AudioEncoder("wav").finish() == streaming_wav_header()


def test_pcm_encoder_is_raw_int16():
    x = sine(3000)
    enc = AudioEncoder("pcm")
    out = enc.push(x[:1000]) + enc.push(x[1000:])
    assert out == to_pcm16(x) and len(out) == 2 * x.size
    assert enc.finish() == b""
    assert AudioEncoder("pcm").finish() == b""


@pytest.mark.parametrize("n", [1, 4000, 24000 + 17])
def test_flac_encoder_whole_file(n):
    x = sine(n)
    enc = AudioEncoder("flac")
    assert not enc.streamed
    assert enc.push(x[: n // 2]) == b"" and enc.push(x[n // 2:]) == b""
    data = enc.finish()
    assert data[:4] == b"fLaC"
    y, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SAMPLE_RATE and y.shape == (n,)
    np.testing.assert_allclose(y, x, atol=1.0 / 32767 + 1e-6)       # lossless at 16 bits


def test_flac_encoder_with_no_audio_writes_a_valid_file():
    data = AudioEncoder("flac").finish()
    assert data[:4] == b"fLaC"
    y, sr = sf.read(io.BytesIO(data))
    assert sr == SAMPLE_RATE and y.size <= 1


@pytest.mark.parametrize("n", [2400, 24000, 50000])
def test_mp3_encoder_whole_file(n):
    x = sine(n)
    enc = AudioEncoder("mp3")
    assert not enc.streamed
    assert enc.push(x[:1000]) == b"" and enc.push(x[1000:]) == b""
    data = enc.finish()
    y, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SAMPLE_RATE
    # MP3 is coded in 1152-sample frames with encoder delay / padding; libsndfile trims
    # them using the LAME header, but a decoder may still be off by up to about a frame.
    assert abs(y.size - n) <= 1152
    # lossy, but the tone is there: its dominant frequency survives
    f = np.fft.rfftfreq(y.size, 1 / sr)[np.argmax(np.abs(np.fft.rfft(y)))]
    assert abs(f - 440.0) < 5.0


def test_mp3_encoder_with_no_audio_writes_one_frame():
    y, sr = sf.read(io.BytesIO(AudioEncoder("mp3").finish()))
    assert sr == SAMPLE_RATE and y.size <= 1152


@pytest.mark.parametrize("fmt", ["ogg", "WAV", "", "opus"])
def test_unknown_format(fmt):
    with pytest.raises(InvalidArgument):
        AudioEncoder(fmt)


# ----------------------------------------------------------------------------- speed
@pytest.mark.parametrize("speed, want", [(0, 1.0), (0.0, 1.0), (1, 1.0), (0.25, 0.25), (4.0, 4.0), (1.5, 1.5)])
def test_check_speed_ok(speed, want):
    assert check_speed(speed) == want


@pytest.mark.parametrize("speed", [0.24, 4.01, -1.0, 100, float("nan"), float("inf")])
def test_check_speed_out_of_range(speed):
    with pytest.raises(InvalidArgument) as e:
        check_speed(speed)
    assert e.value.field == "speed"


@pytest.mark.parametrize("n", [1, 5, 959, 12345])
@pytest.mark.parametrize("speed", [0.25, 0.5, 0.7, 1.5, 2.0, 3.7, 4.0])
def test_time_stretch_length(n, speed):
    y = time_stretch(np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32), speed)
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.size == round(n / speed)


def test_time_stretch_identity_and_empty():
    x = sine(100)
    assert np.array_equal(time_stretch(x, 1.0), x)
    assert time_stretch(np.zeros(0, np.float32), 2.0).size == 0


def dominant_hz(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.fft.rfftfreq(y.size, 1 / SAMPLE_RATE)[np.argmax(spec)])


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_time_stretch_keeps_the_pitch(speed):
    x = sine(SAMPLE_RATE, f=200.0)                       # 1 s of 200 Hz
    y = time_stretch(x, speed)
    assert y.size == round(SAMPLE_RATE / speed)
    assert abs(dominant_hz(y) - 200.0) < 3.0            # a resampler would give 100 / 400 Hz
    mid = y[2000:-2000]
    rms = float(np.sqrt(np.mean(mid ** 2)))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.05           # no dropouts or doubled level
