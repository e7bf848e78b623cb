"""Audio I/O and length arithmetic for the LLM input side (spec §1.2, §1.5).

Torch-free on purpose: the orchestrator and gateway decode and count audio without
importing torch (ARCHITECTURE.md, house rules).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf

from stepaudio2.runtime.errors import AudioTooLarge, InvalidAudio, UnsupportedAudioFormat

SAMPLE_RATE = 16_000           # spec §1.2: the encoder's input rate
CHUNK_SECONDS = 25             # spec §1.2: HF path cuts audio into 25 s chunks
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS
MEL_PAD_SAMPLES = 479          # spec §1.2: right pad before the STFT
HOP_LENGTH = 160               # spec §1.2
N_FFT = 400                    # spec §1.2
N_MELS = 128                   # spec §1.2
MAX_CLIP_SECONDS = 30          # encoder positions: 1500 at 50 fps (spec §1.3)


def mel_frames(num_samples: int) -> int:
    """F = floor((N + 479) / 160): frames `log_mel` returns for N samples (spec §1.2)."""
    return (num_samples + MEL_PAD_SAMPLES) // HOP_LENGTH


def encoder_input_length(frames: int) -> int:
    """The reference passes F - 2 frames as the encoder length (spec §1.2, §9.2)."""
    return frames - 2


def encoder_output_length(mel_len: int) -> int:
    """Encoder frames after conv2 (stride 2) and the 2x average pool (spec §1.3)."""
    return (mel_len + 1) // 2 // 2


def adapter_output_length(enc_len: int) -> int:
    """Adapter conv, stride 2, padding 1 (spec §1.4)."""
    return (enc_len - 1) // 2 + 1


def audio_patch_count(frames: int) -> int:
    """Number of `<audio_patch>` tokens for a chunk of F mel frames (spec §1.5)."""
    return adapter_output_length(encoder_output_length(encoder_input_length(frames)))


# ---------------------------------------------------------------------------
# Decoding, resampling and chunking (spec §1.2: "load the audio and resample to 16 kHz",
# first channel only, 25 s chunks). numpy/scipy/soundfile only: no torch here.
# ---------------------------------------------------------------------------

AudioSource = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

# Leading bytes of the containers libsndfile reads, used only to tell "not audio at all"
# (UnsupportedAudioFormat, HTTP 415) from "a broken file of a known kind" (InvalidAudio).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"RIFF", "WAV"),
    (b"RIFX", "WAV"),
    (b"RF64", "WAV"),
    (b"fLaC", "FLAC"),
    (b"OggS", "OGG"),
    (b"FORM", "AIFF"),
    (b"caff", "CAF"),
    (b".snd", "AU"),
    (b"ID3", "MP3"),
)


def _sniff_container(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _read_source(src: AudioSource) -> bytes:
    """Return the raw bytes of `src` (bytes, a path, or a binary file-like object)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise InvalidAudio(f"audio file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise InvalidAudio(f"audio path {str(path)!r} is a directory, not a file") from None
        except OSError as exc:
            raise InvalidAudio(f"audio file {str(path)!r} could not be read: {exc}") from None
    read = getattr(src, "read", None)
    if callable(read):
        try:
            data = read()
        except Exception as exc:  # a broken stream must not escape as its own type
            raise InvalidAudio(f"audio stream could not be read: {exc}") from None
        if isinstance(data, str):
            raise InvalidAudio("audio stream is a text stream; open it in binary mode ('rb')")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidAudio(f"audio stream returned {type(data).__name__}, not bytes")
        return bytes(data)
    raise InvalidAudio(
        f"unsupported audio source type {type(src).__name__}: "
        "pass bytes, a file path or a binary file-like object"
    )


def _decode_error(data: bytes, exc: Exception) -> InvalidAudio:
    """Turn a soundfile/libsndfile failure into our taxonomy (never re-raise it raw).

    Bytes that start like a known container are a broken file of that kind (400);
    anything else is not audio we decode (415). The magic test, not libsndfile's error
    code, decides: random bytes can fool libsndfile's MP3 probe into other codes, and a
    truncated "RIFF" header reads as "Format not recognised".
    """
    detail = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    container = _sniff_container(data)
    if container is None:
        return UnsupportedAudioFormat(
            "input is not an audio container we can decode (expected WAV, FLAC or OGG); "
            f"libsndfile says: {detail}"
        )
    return InvalidAudio(
        f"{container} audio is unreadable (corrupt or truncated); libsndfile says: {detail}"
    )


def _check_finite(x: np.ndarray, what: str = "audio") -> None:
    if not np.isfinite(x).all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        raise InvalidAudio(f"{what} contains non-finite samples ({n_nan} NaN, {n_inf} Inf)")


def _too_long(seconds: float, max_seconds: float) -> AudioTooLarge:
    return AudioTooLarge(
        f"audio is {seconds:.2f} s long, longer than the {max_seconds:g} s allowed"
    )


def decode_audio(src: AudioSource, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG (anything libsndfile reads) to float32 mono at the file's rate.

    `src` is bytes, a path (str/PathLike) or a binary file-like object. Integer PCM of
    any width (8-bit unsigned, 16, 24, 32) is scaled to [-1, 1]; float files are returned
    as stored. Multichannel audio keeps the FIRST channel only (spec §1.2). Returns
    ``(samples, sample_rate)``.

    Raises :class:`InvalidAudio` (empty input, zero samples, NaN/Inf, corrupt or
    truncated file), :class:`UnsupportedAudioFormat` (bytes that are no audio container)
    and, with `max_seconds`, :class:`AudioTooLarge`.
    """
    data = _read_source(src)
    if len(data) == 0:
        raise InvalidAudio("audio input is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = int(f.samplerate)
            channels = int(f.channels)
            frames = int(f.frames)
            if sr <= 0:
                raise InvalidAudio(f"audio header gives an invalid sample rate ({sr} Hz)")
            if channels <= 0:
                raise InvalidAudio(f"audio header gives an invalid channel count ({channels})")
            # Refuse over-long audio from the header, before decoding all of it.
            if max_seconds is not None and frames / sr > max_seconds:
                raise _too_long(frames / sr, max_seconds)
            x = f.read(dtype="float32", always_2d=True)
    except InvalidAudio:
        raise
    except Exception as exc:  # soundfile.LibsndfileError, RuntimeError, ValueError...
        raise _decode_error(data, exc) from None
    if x.shape[0] == 0:
        raise InvalidAudio("audio contains no samples (zero-length or truncated file)")
    # spec §1.2: the reference keeps channel 0; it does not average channels.
    mono = np.ascontiguousarray(x[:, 0], dtype=np.float32)
    _check_finite(mono)
    if max_seconds is not None and mono.shape[0] / sr > max_seconds:
        raise _too_long(mono.shape[0] / sr, max_seconds)
    return mono, sr


def _check_rate(sr: int, name: str) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)):
        if isinstance(sr, (float, np.floating)) and float(sr).is_integer():
            sr = int(sr)
        else:
            raise InvalidAudio(f"{name} must be a positive integer number of Hz, got {sr!r}")
    sr = int(sr)
    if sr <= 0:
        raise InvalidAudio(f"{name} must be a positive integer number of Hz, got {sr}")
    return sr


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase windowed-sinc resampling (scipy `resample_poly`, Kaiser window), float32.

    up/down are sr_out/sr_in reduced by their gcd; equal rates return `x` as float32
    unchanged. Output length is ceil(len(x) * sr_out / sr_in).
    """
    sr_in = _check_rate(sr_in, "input sample rate")
    sr_out = _check_rate(sr_out, "output sample rate")
    x = np.asarray(x)
    if x.ndim != 1:
        raise InvalidAudio(f"resample expects 1-D mono audio, got shape {tuple(x.shape)}")
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    from scipy.signal import resample_poly  # local: scipy.signal is slow to import

    g = math.gcd(sr_in, sr_out)
    y = resample_poly(x.astype(np.float64, copy=False), sr_out // g, sr_in // g)
    return y.astype(np.float32)


def load_audio(
    src: AudioSource | np.ndarray,
    sr: int = SAMPLE_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode and resample to `sr` (default 16 kHz): float32 mono, 1-D (spec §1.2).

    `src` may also be a 1-D float np.ndarray that is already at `sr`. With `max_seconds`,
    longer audio raises :class:`AudioTooLarge`.
    """
    sr = _check_rate(sr, "target sample rate")
    if isinstance(src, np.ndarray):
        if src.ndim != 1:
            raise InvalidAudio(f"audio array must be 1-D mono, got shape {tuple(src.shape)}")
        if not np.issubdtype(src.dtype, np.floating):
            raise InvalidAudio(
                f"audio array must hold floats in [-1, 1], got dtype {src.dtype}"
            )
        if src.shape[0] == 0:
            raise InvalidAudio("audio contains no samples")
        _check_finite(src)
        if max_seconds is not None and src.shape[0] / sr > max_seconds:
            raise _too_long(src.shape[0] / sr, max_seconds)
        return np.ascontiguousarray(src, dtype=np.float32)
    x, sr_in = decode_audio(src, max_seconds=max_seconds)
    return resample(x, sr_in, sr)


def chunk_audio(x: np.ndarray, chunk_samples: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Cut audio into consecutive pieces of at most `chunk_samples` (25 s; spec §1.2).

    Same slicing as the reference: ``x[i:i + chunk_samples]`` for i in steps of
    `chunk_samples`; the last piece holds the remainder. Pieces are views of `x`.
    """
    if isinstance(chunk_samples, bool) or int(chunk_samples) != chunk_samples or chunk_samples <= 0:
        raise InvalidAudio(f"chunk_samples must be a positive integer, got {chunk_samples!r}")
    chunk_samples = int(chunk_samples)
    x = np.asarray(x)
    if x.ndim != 1:
        raise InvalidAudio(f"chunk_audio expects 1-D mono audio, got shape {tuple(x.shape)}")
    return [x[i : i + chunk_samples] for i in range(0, x.shape[0], chunk_samples)]
