"""The LLM-side log-mel front end (spec §1.2), in torch like the reference.

`log_mel` is the reference `log_mel_spectrogram` step for step: 479-sample right pad,
`torch.stft(400, 160, hann, center=True)`, drop the last frame, power, a librosa-default
128-mel filterbank, then Whisper-style log10 / clamp / max-8 / (x + 4) / 4. Decoding,
resampling and chunking live in the torch-free `stepaudio2.model.audio`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from stepaudio2.model.audio import (
    HOP_LENGTH,
    MAX_CLIP_SECONDS,
    MEL_PAD_SAMPLES,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
)
from stepaudio2.runtime.errors import InvalidAudio

MAX_CLIP_SAMPLES = MAX_CLIP_SECONDS * SAMPLE_RATE  # 480,000: 1500 encoder positions (spec §1.3)

# Slaney mel scale, librosa's default (htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3.0                  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0                 # where the log part starts
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP   # = 15 mels
_LOGSTEP = math.log(6.4) / 27.0      # ln(6.4)/27 per mel above 1 kHz


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    # np.maximum keeps log() away from 0 Hz; those entries take the linear branch anyway.
    logpart = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, logpart, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    logpart = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, logpart, linear)


@functools.lru_cache(maxsize=16)
def mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Mel filterbank [n_mels, 1 + n_fft // 2], float32, read-only (spec §1.2).

    Equal to ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`` with its defaults
    (fmin 0, fmax sr/2, htk=False Slaney scale, norm='slaney'), without depending on
    librosa. Triangles are computed in float64; like librosa (whose weight array is
    float32) they are rounded to float32 before the Slaney area normalisation
    2 / (f[i+2] - f[i]) is applied and the product rounded again, so the result is
    bit-for-bit librosa's. Cached per arguments: copy before modifying.
    """
    if sr <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError(f"mel_filters needs positive sr, n_fft, n_mels; got {sr}, {n_fft}, {n_mels}")
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)                      # [1 + n_fft//2]
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2)
    edge_hz = _mel_to_hz(mel_edges)                                  # [n_mels + 2]
    widths = np.diff(edge_hz)                                        # [n_mels + 1]
    dist = edge_hz[:, None] - fft_hz[None, :]                        # edge minus bin
    rising = -dist[:-2] / widths[:-1, None]                          # 0 at left edge, 1 at centre
    falling = dist[2:] / widths[1:, None]                            # 1 at centre, 0 at right edge
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edge_hz[2:] - edge_hz[:-2])                   # norm='slaney'
    out = (tri.astype(np.float64) * area_norm[:, None]).astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=16)
def _filters_tensor(n_mels: int, device: str) -> torch.Tensor:
    return torch.from_numpy(mel_filters(SAMPLE_RATE, N_FFT, n_mels).copy()).to(device)


def _as_waveform(waveform_16k, dtype: torch.dtype) -> torch.Tensor:
    """Validate one clip and return it as a 1-D `dtype` tensor (spec §1.2, §1.3 limits)."""
    if isinstance(waveform_16k, torch.Tensor):
        x = waveform_16k.detach()
        if not x.is_floating_point():
            raise InvalidAudio(f"waveform must hold floats in [-1, 1], got dtype {x.dtype}")
    else:
        arr = np.asarray(waveform_16k)
        if not np.issubdtype(arr.dtype, np.floating):
            raise InvalidAudio(f"waveform must hold floats in [-1, 1], got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dim() != 1:
        raise InvalidAudio(f"waveform must be 1-D mono 16 kHz audio, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise InvalidAudio("waveform is empty (0 samples)")
    if n > MAX_CLIP_SAMPLES:
        raise InvalidAudio(
            f"waveform is {n / SAMPLE_RATE:.2f} s ({n} samples), longer than the "
            f"{MAX_CLIP_SECONDS} s one clip may be; cut it into 25 s chunks first"
        )
    x = x.to(dtype)
    if not bool(torch.isfinite(x).all()):
        raise InvalidAudio("waveform contains non-finite samples (NaN or Inf)")
    return x


def log_mel(
    waveform_16k,
    n_mels: int = N_MELS,
    padding: int = MEL_PAD_SAMPLES,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-mel [n_mels, F] of one ≤30 s clip, 16 kHz mono, as the reference (spec §1.2).

    F = floor((N + padding) / 160), i.e. `mel_frames(N)` for the default padding.
    Accepts a 1-D numpy array or torch tensor; a tensor stays on its device.

    The default float32 is what the reference computes in, and what serving uses. Its
    float32 FFT round-off reaches ~5e-5 (in output units) in bins 6-8 decades below the
    clip's peak, identically in the reference; `dtype=torch.float64` runs the same steps
    in double precision (same float32 librosa filter values) to check the math itself.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"log_mel computes in float32 or float64, not {dtype}")
    audio = _as_waveform(waveform_16k, dtype)
    if padding > 0:
        audio = F.pad(audio, (0, padding))                            # right pad, zeros
    window = torch.hann_window(N_FFT, dtype=dtype, device=audio.device)  # periodic Hann
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2                            # drop the last frame
    mel_spec = _filters_tensor(n_mels, str(audio.device)).to(dtype) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_batch(waves: list, n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels of several clips: (mels [B, n_mels, T_max], frames long [B]).

    Each clip is computed alone (as `log_mel`) and zero-padded on the right to the
    longest; `frames[i]` is clip i's raw F, the length `encode_audio` expects.
    """
    if len(waves) == 0:
        raise InvalidAudio("log_mel_batch needs at least one waveform")
    mels = [log_mel(w, n_mels=n_mels) for w in waves]
    frames = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
    out = mels[0].new_zeros((len(mels), n_mels, int(frames.max())))
    for i, m in enumerate(mels):
        out[i, :, : m.shape[1]] = m
    return out, frames
