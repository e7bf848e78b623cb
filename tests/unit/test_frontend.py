"""The LLM-side log-mel front end against an independent float64 NumPy reference (spec §1.2)
and the frame / `<audio_patch>` arithmetic against spec §1.5's table."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepaudio2.model.audio import (
    audio_patch_count,
    encoder_input_length,
    encoder_output_length,
    mel_frames,
)
from stepaudio2.model.frontend import log_mel, log_mel_batch, mel_filters
from stepaudio2.runtime.errors import InvalidAudio

SR = 16_000
N_FFT = 400
HOP = 160
TOL = 1e-5  # PUBLIC_API.md: log-mel tolerance, fp32 on CPU


# ---------------------------------------------------------------------------
# Independent float64 reference. Written from the formulas (spec §1.2; Slaney mel scale
# and area norm as librosa documents them), deliberately scalar and loop-based so it
# shares no code path with services/model/frontend.py.
# ---------------------------------------------------------------------------

def _slaney_hz_to_mel(hz: float) -> float:
    if hz < 1000.0:
        return hz * 3.0 / 200.0                                   # 200/3 Hz per mel
    return 15.0 + 27.0 * math.log(hz / 1000.0) / math.log(6.4)    # 27 mels per ln(6.4)


def _slaney_mel_to_hz(mel: float) -> float:
    if mel < 15.0:
        return mel * 200.0 / 3.0
    return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def reference_filterbank(sr: int = SR, n_fft: int = N_FFT, n_mels: int = 128) -> np.ndarray:
    top = _slaney_hz_to_mel(sr / 2.0)
    edges = [_slaney_mel_to_hz(top * k / (n_mels + 1)) for k in range(n_mels + 2)]
    n_bins = n_fft // 2 + 1
    fb = np.zeros((n_mels, n_bins), dtype=np.float64)
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        height = 2.0 / (right - left)          # unit area in Hz ("slaney" norm)
        for b in range(n_bins):
            f = b * sr / n_fft
            if left < f <= centre:
                fb[m, b] = height * (f - left) / (centre - left)
            elif centre < f < right:
                fb[m, b] = height * (right - f) / (right - centre)
    return fb


_REF_FB = reference_filterbank()


def reference_log_mel(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = np.concatenate([x, np.zeros(479)])                  # right pad 479 zeros
    half = N_FFT // 2
    # reflect padding (edge sample not repeated), written out by hand
    left = x[1 : half + 1][::-1]
    right = x[-half - 1 : -1][::-1]
    x = np.concatenate([left, x, right])
    n_frames = 1 + (len(x) - N_FFT) // HOP
    n = np.arange(N_FFT)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)     # periodic Hann
    frames = np.stack([x[i * HOP : i * HOP + N_FFT] for i in range(n_frames)])
    spec = np.fft.rfft(frames * window, axis=1)             # float64 DFT
    power = np.abs(spec[:-1]) ** 2                          # drop the last frame
    mel = _REF_FB @ power.T                                 # [n_mels, F]
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    t = np.arange(int(3.3 * SR)) / SR
    noise = 0.3 * rng.standard_normal(t.size)
    # linear chirp 50 Hz -> 7.9 kHz
    f0, f1, dur = 50.0, 7900.0, t[-1]
    chirp = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * dur)))
    # speech-like: 19 harmonics of a vibrato'd 140 Hz pitch, syllable-rate envelope
    pitch_phase = 2 * np.pi * 140.0 * (t + 0.1 * (1 - np.cos(2 * np.pi * 0.7 * t)) / (2 * np.pi * 0.7))
    voiced = sum(np.sin(k * pitch_phase) / k for k in range(1, 20))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t)) ** 2
    speech = 0.2 * voiced * envelope
    quiet = 1e-5 * rng.standard_normal(t.size)
    return {"noise": noise, "chirp": chirp, "speech_like": speech, "quiet": quiet}


SIGNALS = {k: v.astype(np.float32) for k, v in _signals().items()}


# ---------------------------------------------------------------------------
# mel_filters
# ---------------------------------------------------------------------------

def test_mel_filters_shape_dtype_nonnegative_readonly():
    fb = mel_filters()
    assert fb.shape == (128, 201)
    assert fb.dtype == np.float32
    assert (fb >= 0).all()
    assert (fb.sum(axis=1) > 0).all(), "no empty mel filter at 16 kHz / 400 / 128"
    assert not fb.flags.writeable
    assert mel_filters() is fb  # cached per arguments
    assert mel_filters(n_mels=80).shape == (80, 201)


def test_mel_filters_match_independent_float64_filterbank():
    for n_mels in (128, 80):
        ours = mel_filters(SR, N_FFT, n_mels).astype(np.float64)
        ref = reference_filterbank(SR, N_FFT, n_mels)
        assert np.abs(ours - ref).max() <= 1e-6
        # and relative to each filter's height: only float32 rounding apart
        assert (np.abs(ours - ref) <= 1e-6 * ref.max(axis=1, keepdims=True) + 1e-12).all()


def test_mel_filters_row_sums_have_unit_area():
    # Slaney norm: each triangle has area 1 in Hz. Filters wide enough to be sampled by
    # several 40 Hz bins sum (times the bin width) to ~1; narrow low ones are undersampled.
    fb = mel_filters().astype(np.float64)
    df = SR / N_FFT
    edges = [_slaney_mel_to_hz(_slaney_hz_to_mel(SR / 2) * k / 129) for k in range(130)]
    widths = np.array([edges[m + 2] - edges[m] for m in range(128)])
    wide = widths >= 4 * df              # the top 36 filters
    assert wide.sum() >= 30
    np.testing.assert_allclose(fb[wide].sum(axis=1) * df, 1.0, rtol=0.05)


# ---------------------------------------------------------------------------
# log_mel numerics
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_log_mel_float64_path_matches_reference(name):
    # The same steps in double precision: checks the math (pad, reflect, framing, window,
    # last-frame drop, filterbank, log/clamp/scale) at the spec tolerance and well below.
    x = SIGNALS[name]
    ours = log_mel(x, dtype=torch.float64).numpy()
    ref = reference_log_mel(x)
    assert ours.shape == ref.shape == (128, mel_frames(len(x)))
    err = np.abs(ours - ref).max()
    assert err <= TOL
    assert err <= 1e-7  # only the float32 filter values separate the two


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_log_mel_float32_matches_reference(name):
    # Serving computes in float32 like the reference. float32 FFT round-off is relative
    # to a frame's peak, so mel bins far below the peak carry more error (measured up to
    # ~5e-5 at 6-8 decades down for the chirp); the reference's float32 torch.stft has
    # exactly the same error, so that is what matching the reference means. Within 5
    # decades of the clip's peak (the part that carries the signal) the spec tolerance holds.
    x = SIGNALS[name]
    ours = log_mel(x)
    assert ours.dtype == torch.float32
    ours = ours.numpy().astype(np.float64)
    ref = reference_log_mel(x)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    decades_below_peak = (ref.max() - ref) * 4.0
    assert err[decades_below_peak <= 5.0].max() <= TOL
    assert err.max() <= 1e-4


def test_log_mel_matches_reference_on_short_and_full_length_clips():
    rng = np.random.default_rng(7)
    for n in (1, 2, 159, 160, 161, 400, 401, 30 * SR):
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        ours = log_mel(x, dtype=torch.float64).numpy()
        assert ours.shape == (128, mel_frames(n))
        assert np.abs(ours - reference_log_mel(x)).max() <= TOL


def test_log_mel_value_range_and_inputs():
    x = SIGNALS["speech_like"]
    a = log_mel(x)
    b = log_mel(torch.from_numpy(x))
    c = log_mel(x.astype(np.float64))                 # float64 input is computed in float32
    assert torch.equal(a, b) and torch.equal(a, c)
    # Whisper-style normalisation: max is (max_log + 4)/4, floor 2 (= 8 decades / 4) below
    assert float(a.max() - a.min()) <= 2.0 + 1e-6


# ---------------------------------------------------------------------------
# spec §1.5 table: frames and <audio_patch> counts
# ---------------------------------------------------------------------------

SPEC_1_5 = [
    # seconds, samples, mel frames F, encoder frames, <audio_patch> tokens
    (0.5, 8_000, 52, 12, 6),
    (1.0, 16_000, 102, 25, 13),
    (2.0, 32_000, 202, 50, 25),
    (10.0, 160_000, 1002, 250, 125),
    (25.0, 400_000, 2502, 625, 313),
    (29.98, 479_680, 3000, 749, 375),
]


@pytest.mark.parametrize("seconds,samples,frames,enc,patches", SPEC_1_5)
def test_frame_and_patch_counts_reproduce_spec_table(seconds, samples, frames, enc, patches):
    assert round(seconds * SR) == samples
    assert mel_frames(samples) == frames
    assert encoder_output_length(encoder_input_length(frames)) == enc
    assert audio_patch_count(frames) == patches
    # spec §1.5's closed form
    assert ((frames - 2 + 1) // 4 + 2 - 3) // 2 + 1 == patches
    x = (0.01 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    assert tuple(log_mel(x).shape) == (128, frames)


# ---------------------------------------------------------------------------
# errors and batching
# ---------------------------------------------------------------------------

def test_log_mel_rejects_empty():
    with pytest.raises(InvalidAudio, match="empty"):
        log_mel(np.zeros(0, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_log_mel_rejects_non_finite(bad):
    x = np.zeros(16_000, dtype=np.float32)
    x[123] = bad
    with pytest.raises(InvalidAudio, match="non-finite"):
        log_mel(x)
    with pytest.raises(InvalidAudio, match="non-finite"):
        log_mel(torch.from_numpy(x))


def test_log_mel_rejects_more_than_30_seconds():
    assert log_mel(np.zeros(30 * SR, dtype=np.float32)).shape == (128, 3002)
    with pytest.raises(InvalidAudio, match=r"30\.00 s.*longer than the 30 s"):
        log_mel(np.zeros(30 * SR + 1, dtype=np.float32))


def test_log_mel_rejects_wrong_shape_and_dtype():
    with pytest.raises(InvalidAudio, match="1-D"):
        log_mel(np.zeros((2, 1000), dtype=np.float32))
    with pytest.raises(InvalidAudio, match="floats"):
        log_mel(np.zeros(1000, dtype=np.int16))
    with pytest.raises(InvalidAudio, match="floats"):
        log_mel(torch.zeros(1000, dtype=torch.int32))


def test_log_mel_batch_pads_with_zeros_on_the_right():
    rng = np.random.default_rng(3)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16_000, 4_321, 40_000)]
    mels, frames = log_mel_batch(waves)
    assert frames.dtype == torch.long
    assert frames.tolist() == [mel_frames(len(w)) for w in waves]
    assert tuple(mels.shape) == (3, 128, max(frames.tolist()))
    for i, w in enumerate(waves):
        f = int(frames[i])
        assert torch.equal(mels[i, :, :f], log_mel(w))
        assert (mels[i, :, f:] == 0).all()
    with pytest.raises(InvalidAudio):
        log_mel_batch([])
