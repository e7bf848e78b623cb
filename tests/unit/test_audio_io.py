"""Audio decoding, resampling and chunking (spec §1.2), on real files written with soundfile."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from stepaudio2.model.audio import (
    CHUNK_SAMPLES,
    chunk_audio,
    decode_audio,
    load_audio,
    resample,
)
from stepaudio2.runtime.errors import AudioTooLarge, InvalidAudio, UnsupportedAudioFormat

SR = 16_000


def _test_signal(n: int, seed: int = 0) -> np.ndarray:
    """A 440 Hz tone plus a little noise, safely inside [-1, 1)."""
    t = np.arange(n) / SR
    x = 0.7 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * np.random.default_rng(seed).standard_normal(n)
    return np.clip(x, -0.95, 0.95)


def _wav_bytes(x: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return amp * np.sin(2 * np.pi * freq * t)


# ---------------------------------------------------------------------------
# decoding: formats and bit depths
# ---------------------------------------------------------------------------

def test_wav_16bit_round_trip(tmp_path):
    x = _test_signal(SR)
    path = tmp_path / "a.wav"
    sf.write(path, x, SR, subtype="PCM_16")
    y, sr = decode_audio(path)
    assert sr == SR
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == len(x)
    # libsndfile writes floats scaled by 32767 and reads ints as v / 32768: one step at most
    assert np.abs(y - x).max() <= 1 / 32768 + 1e-7
    # raw int16 samples decode to exactly v / 32768
    ints = np.array([0, 1, -1, 12345, -23456, 32767, -32768], dtype=np.int16)
    sf.write(path, ints, SR, subtype="PCM_16")
    y, _ = decode_audio(path)
    np.testing.assert_array_equal(y, (ints / 32768).astype(np.float32))


@pytest.mark.parametrize(
    "subtype,step",
    [
        ("PCM_U8", 1 / 128),
        ("PCM_16", 1 / 32768),
        ("PCM_24", 1 / 2**23),
        ("PCM_32", 1 / 2**31),
        ("FLOAT", 0.0),
        ("DOUBLE", 0.0),
    ],
)
def test_wav_bit_depths_decode_to_the_right_values(tmp_path, subtype, step):
    x = _test_signal(4000, seed=1)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, SR, subtype=subtype)
    assert sf.info(str(path)).subtype == subtype
    y, sr = decode_audio(path)
    assert sr == SR and y.dtype == np.float32 and len(y) == len(x)
    # within one quantisation step (plus float32 rounding of the result)
    assert np.abs(y.astype(np.float64) - x).max() <= step + 1e-7
    assert np.abs(y).max() <= 1.0


def test_pcm_u8_midpoint_and_extremes(tmp_path):
    # 8-bit WAV is unsigned with 128 as zero: check the offset is removed.
    path = tmp_path / "u8.wav"
    sf.write(path, np.array([0.0, 0.5, -0.5, -1.0]), SR, subtype="PCM_U8")
    y, _ = decode_audio(path)
    np.testing.assert_allclose(y, [0.0, 0.5, -0.5, -1.0], atol=1 / 128)


def test_flac_decodes(tmp_path):
    x = _test_signal(12_345, seed=2)
    path = tmp_path / "a.flac"
    sf.write(path, x, SR, format="FLAC", subtype="PCM_16")
    y, sr = decode_audio(path)
    assert sr == SR and len(y) == len(x)
    assert np.abs(y - x).max() <= 0.5 / 32768 + 1e-7   # lossless


def test_ogg_vorbis_decodes(tmp_path):
    x = _sine(1000.0, SR, 1.0, amp=0.5)
    path = tmp_path / "a.ogg"
    sf.write(path, x, SR, format="OGG", subtype="VORBIS")
    y, sr = decode_audio(path)
    assert sr == SR
    assert len(y) == len(x)
    # lossy: check the content, not the samples
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) == 1000                  # 1 Hz bins for a 1 s clip
    rms = np.sqrt(np.mean(y[2000:-2000].astype(np.float64) ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("channels", [2, 3])
def test_multichannel_keeps_the_first_channel(tmp_path, channels):
    # spec §1.2: the reference keeps channel 0, it does not average.
    n = 8000
    cols = [_sine(440.0 * (c + 1), SR, n / SR, amp=0.3 + 0.2 * c) for c in range(channels)]
    data = np.stack(cols, axis=1)
    path = tmp_path / "multi.wav"
    sf.write(path, data, SR, subtype="PCM_16")
    y, sr = decode_audio(path)
    assert y.ndim == 1 and len(y) == n
    assert np.abs(y - cols[0]).max() <= 1 / 32768
    mean = data.mean(axis=1)
    assert np.abs(y - mean).max() > 0.1                  # not the channel average
    assert load_audio(path).shape == (n,)


# ---------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sr_in", [8_000, 22_050, 44_100, 48_000])
def test_load_audio_resamples_to_16k_keeping_frequency_and_amplitude(tmp_path, sr_in):
    seconds = 2.0
    x = _sine(1000.0, sr_in, seconds, amp=0.5)
    path = tmp_path / f"in_{sr_in}.wav"
    sf.write(path, x, sr_in, subtype="FLOAT")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == int(seconds * SR)
    spectrum = np.abs(np.fft.rfft(y.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(y), 1 / SR)
    assert freqs[np.argmax(spectrum)] == pytest.approx(1000.0, abs=0.5)
    middle = y[SR // 4 : -SR // 4].astype(np.float64)    # skip the filter's edge transients
    peak = np.sqrt(2 * np.mean(middle**2))
    assert peak == pytest.approx(0.5, rel=0.02)
    # against the exact 16 kHz sine, away from the edges
    exact = _sine(1000.0, SR, seconds, amp=0.5)
    assert np.abs(y[SR // 4 : -SR // 4] - exact[SR // 4 : -SR // 4]).max() < 0.01


def test_load_audio_at_16k_is_exactly_the_decoded_samples(tmp_path):
    x = _test_signal(SR)
    path = tmp_path / "a.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    y = load_audio(path)
    np.testing.assert_array_equal(y, x.astype(np.float32))


def test_resample_lengths_identity_and_validation():
    x = np.random.default_rng(0).standard_normal(44_100).astype(np.float32)
    y = resample(x, 44_100, 16_000)
    assert y.dtype == np.float32 and len(y) == 16_000
    assert len(resample(x[:441], 44_100)) == 160
    assert len(resample(x[:1000], 8_000, 16_000)) == 2000
    same = resample(x, 16_000, 16_000)
    np.testing.assert_array_equal(same, x)
    assert resample(x.astype(np.float64), 16_000).dtype == np.float32
    assert resample(np.zeros(0, np.float32), 8_000).shape == (0,)
    for bad in (0, -16_000):
        with pytest.raises(InvalidAudio, match="sample rate"):
            resample(x, bad, 16_000)
        with pytest.raises(InvalidAudio, match="sample rate"):
            resample(x, 16_000, bad)
    with pytest.raises(InvalidAudio, match="1-D"):
        resample(np.zeros((2, 10)), 8_000)


# ---------------------------------------------------------------------------
# sources: bytes, paths, file-like objects, arrays
# ---------------------------------------------------------------------------

def test_bytes_path_and_file_like_inputs_agree(tmp_path):
    x = _test_signal(9000, seed=3)
    data = _wav_bytes(x, sr=22_050)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    ref, sr = decode_audio(data)
    assert sr == 22_050
    for src in (bytearray(data), memoryview(data), str(path), path, io.BytesIO(data)):
        y, sr2 = decode_audio(src)
        assert sr2 == 22_050
        np.testing.assert_array_equal(y, ref)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(decode_audio(f)[0], ref)
    expected = load_audio(data)
    assert len(expected) == int(np.ceil(9000 * 16_000 / 22_050))
    for src in (str(path), path, io.BytesIO(data)):
        np.testing.assert_array_equal(load_audio(src), expected)


def test_load_audio_accepts_a_16k_array():
    x = _test_signal(1000)
    y = load_audio(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))
    with pytest.raises(InvalidAudio, match="non-finite"):
        load_audio(np.array([0.0, np.nan, 0.1]))
    with pytest.raises(InvalidAudio, match="1-D"):
        load_audio(np.zeros((2, 100)))
    with pytest.raises(InvalidAudio, match="float"):
        load_audio(np.zeros(100, dtype=np.int16))
    with pytest.raises(InvalidAudio, match="no samples"):
        load_audio(np.zeros(0, dtype=np.float32))


# ---------------------------------------------------------------------------
# errors: the type and a reason that names the problem
# ---------------------------------------------------------------------------

def test_empty_bytes():
    with pytest.raises(InvalidAudio) as ei:
        decode_audio(b"")
    assert "empty" in ei.value.reason and "0 bytes" in ei.value.reason
    assert not isinstance(ei.value, UnsupportedAudioFormat)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(InvalidAudio, match="empty"):
        load_audio(path)


@pytest.mark.parametrize(
    "payload",
    [
        np.random.default_rng(42).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"this is plain text, not audio\n" * 20,
        b'{"audio": "base64?"}',
    ],
    ids=["random", "text", "json"],
)
def test_non_audio_bytes_are_unsupported(payload):
    with pytest.raises(UnsupportedAudioFormat) as ei:
        decode_audio(payload)
    assert "not an audio container" in ei.value.reason
    assert ei.value.code == "UNSUPPORTED_MEDIA" and ei.value.mapping.http == 415


def test_truncated_wav_header():
    data = _wav_bytes(_test_signal(1000))
    for cut in (6, 20, 40):
        with pytest.raises(InvalidAudio) as ei:
            decode_audio(data[:cut])
        assert not isinstance(ei.value, UnsupportedAudioFormat)   # a broken WAV, not "not audio"
        assert "WAV" in ei.value.reason
        assert "truncated" in ei.value.reason or "corrupt" in ei.value.reason


def test_truncated_flac():
    data = _wav_bytes(_test_signal(20_000), fmt="FLAC", subtype="PCM_16")
    with pytest.raises(InvalidAudio) as ei:
        decode_audio(data[: len(data) // 2])
    assert "FLAC" in ei.value.reason
    assert ei.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_wav_with_non_finite_samples(tmp_path, bad):
    x = _test_signal(1000)
    x[500] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    with pytest.raises(InvalidAudio) as ei:
        decode_audio(path)
    assert "non-finite" in ei.value.reason
    assert ("1 NaN" if np.isnan(bad) else "1 Inf") in ei.value.reason


def test_zero_length_wav():
    data = _wav_bytes(np.zeros(0))
    assert len(data) > 0
    with pytest.raises(InvalidAudio) as ei:
        decode_audio(data)
    assert "no samples" in ei.value.reason


def test_max_seconds_exceeded(tmp_path):
    data = _wav_bytes(_test_signal(3 * SR))
    with pytest.raises(AudioTooLarge) as ei:
        load_audio(data, max_seconds=2.5)
    assert "3.00 s" in ei.value.reason and "2.5 s" in ei.value.reason
    assert ei.value.code == "TOO_LARGE"
    with pytest.raises(AudioTooLarge, match="3.00 s"):
        decode_audio(data, max_seconds=2.5)
    with pytest.raises(AudioTooLarge, match="3.00 s"):
        load_audio(_test_signal(3 * SR), max_seconds=2.5)
    assert len(load_audio(data, max_seconds=3.0)) == 3 * SR


def test_bad_sources():
    with pytest.raises(InvalidAudio, match="does not exist"):
        decode_audio("/nonexistent/dir/a.wav")
    with pytest.raises(InvalidAudio, match="binary mode"):
        decode_audio(io.StringIO("RIFF"))
    with pytest.raises(InvalidAudio, match="unsupported audio source type"):
        decode_audio(12345)


@pytest.mark.parametrize(
    "fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]
)
def test_damaged_files_never_leak_soundfile_errors(fmt, subtype):
    # Bounded fuzz: truncations and byte flips either decode to finite float32 audio or
    # raise our InvalidAudio (never a raw soundfile/libsndfile exception).
    data = _wav_bytes(_test_signal(8000, seed=5), fmt=fmt, subtype=subtype)
    rng = np.random.default_rng(11)
    for i in range(40):
        damaged = bytearray(data)
        if i % 2:
            damaged = damaged[: int(rng.integers(0, len(damaged)))]
        else:
            for _ in range(int(rng.integers(1, 16))):
                damaged[int(rng.integers(0, len(damaged)))] = int(rng.integers(0, 256))
        try:
            y, sr = decode_audio(bytes(damaged))
        except InvalidAudio as exc:
            assert exc.reason
        else:
            assert y.dtype == np.float32 and y.ndim == 1 and len(y) > 0 and sr > 0
            assert np.isfinite(y).all()


# ---------------------------------------------------------------------------
# chunking and the torch-free import
# ---------------------------------------------------------------------------

def test_chunk_audio_70_seconds():
    x = np.arange(70 * SR, dtype=np.float32)
    pieces = chunk_audio(x)
    assert [len(p) for p in pieces] == [25 * SR, 25 * SR, 20 * SR]
    assert CHUNK_SAMPLES == 400_000
    np.testing.assert_array_equal(np.concatenate(pieces), x)
    assert [len(p) for p in chunk_audio(x[: 50 * SR])] == [25 * SR, 25 * SR]
    assert [len(p) for p in chunk_audio(x[:10])] == [10]
    assert chunk_audio(x[:0]) == []
    with pytest.raises(InvalidAudio):
        chunk_audio(x, 0)


def test_audio_module_does_not_import_torch():
    code = (
        "import io, sys\n"
        "import numpy as np, soundfile as sf\n"
        "import stepaudio2.model.audio as a\n"
        "buf = io.BytesIO(); sf.write(buf, np.zeros(4410), 44100, format='WAV')\n"
        "assert len(a.load_audio(buf.getvalue())) == 1600\n"
        "a.chunk_audio(np.zeros(10))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
