"""Voice (timbre prompt) features from a reference recording (spec section 3.3).

One reference clip gives the three things token2wav conditions on, computed as the
reference ``token2wav.py`` does (stepfun-ai/Step-Audio2, ``_prepare_prompt``):

1. **prompt tokens**: 16 kHz audio -> Whisper-style 128-bin log-mel (``s3tokenizer.
   log_mel_spectrogram``: no extra padding, ``stft(400, 160, hann, center=True)``, last
   frame dropped, power, librosa 128-mel filters, log10 clamp 1e-10, floor at max - 8,
   ``(x + 4) / 4``) -> ``speech_tokenizer_v2_25hz.onnx`` (inputs ``feats`` [1, 128, F]
   float32 and ``feats_length`` [1] int32) -> 25 Hz codes;
2. **speaker embedding**: 16 kHz audio -> 80-bin Kaldi fbank (torchaudio
   ``kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)``, every other option
   Kaldi's default: 25 ms / 10 ms povey frames, pre-emphasis 0.97, DC removal, snip edges,
   power spectrum, low 20 Hz, log) computed with kaldi-native-fbank, minus its per-utterance
   mean -> ``campplus.onnx`` ([1, frames, 80] float32) -> 192 values;
3. **prompt mel**: the clip (channels averaged) resampled to 24 kHz -> Matcha/CosyVoice
   ``mel_spectrogram`` (reflect pad (1920 - 480) / 2 each side, ``stft(1920, 480, hann(1920),
   center=False)``, magnitude ``sqrt(re^2 + im^2 + 1e-9)``, librosa 80-mel filters 0-8000 Hz,
   ``log(clamp(x, 1e-5))``) -> [T, 80] at 50 fps, then padded by replicating the last
   frame (or cut) to exactly 2 x len(tokens), as the reference's ``F.pad(mode='replicate')``.

Known differences from the reference: resampling uses scipy's polyphase Kaiser filter
(``stepaudio2.model.audio.resample``) where the reference uses torchaudio's sinc
resampler, so mel values differ slightly for clips not already at 16/24 kHz.

Both ONNX models run in onnxruntime on CPU with one intra-op thread (as the reference
runs CAM++). Their input/output names are read from each model at load time, and the
expected interface is checked: a mismatch is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np

from stepaudio2.model.audio import SAMPLE_RATE as SR_16K
from stepaudio2.model.audio import AudioSource, decode_audio, resample
from stepaudio2.model.token2wav.checkpoint import FLOW_YAML, ONNX_FILES
from stepaudio2.model.token2wav.config import MEL_BINS, SAMPLE_RATE as SR_24K, TOKEN_MEL_RATIO
from stepaudio2.runtime.errors import CheckpointError, InvalidArgument, InvalidAudio
from stepaudio2.runtime.voice_store import Voice, check_voice_id, utc_now

CAMPPLUS_ONNX, TOKENIZER_ONNX = ONNX_FILES
SPEAKER_DIM = 192
TOKENIZER_MELS = 128
SPEECH_VOCAB = 6561

# Prompt mel (spec section 3.3): 24 kHz, 50 fps.
PROMPT_N_FFT, PROMPT_HOP, PROMPT_WIN, PROMPT_FMIN, PROMPT_FMAX = 1920, 480, 1920, 0.0, 8000.0

# Reference-clip validation.
MIN_SECONDS = 1.0                 # shorter clips give too few prompt tokens to carry a timbre
MAX_SECONDS = 30.0                # the S3 tokenizer refuses > 30 s; longer clips are TRIMMED to this
MAX_DECODE_SECONDS = 600.0        # beyond this a clip is refused (AudioTooLarge) before decoding it
SILENCE_RMS = 10 ** (-60 / 20)    # -60 dBFS: below this the clip counts as silent


# ----------------------------------------------------------------------------- mel filters
def _hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    logstep = math.log(6.4) / 27.0
    logpart = min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, logpart, hz / f_sp)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    logstep = math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.lru_cache(maxsize=8)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)`` with
    librosa's defaults (Slaney scale, Slaney area norm), float32 [n_mels, 1 + n_fft // 2],
    read-only. Same arithmetic as :func:`stepaudio2.model.frontend.mel_filters`, plus fmin/fmax."""
    fmax = sr / 2.0 if fmax is None else float(fmax)
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    edge_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edge_hz)
    dist = edge_hz[:, None] - fft_hz[None, :]
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    out = (tri.astype(np.float64) * (2.0 / (edge_hz[2:] - edge_hz[:-2]))[:, None]).astype(np.float32)
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------- features
def tokenizer_log_mel(wav_16k: np.ndarray) -> np.ndarray:
    """The S3 tokenizer's 128-bin log-mel [128, N // 160] of 16 kHz audio (no extra padding)."""
    from stepaudio2.model.frontend import log_mel

    return log_mel(np.ascontiguousarray(wav_16k, dtype=np.float32), n_mels=TOKENIZER_MELS, padding=0).numpy()


def kaldi_fbank(wav_16k: np.ndarray) -> np.ndarray:
    """80-bin Kaldi fbank [frames, 80] of 16 kHz audio in [-1, 1] (dither 0, Kaldi defaults),
    as torchaudio's ``kaldi.fbank(wav, num_mel_bins=80, dither=0, sample_frequency=16000)``."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(SR_16K)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(float(SR_16K), np.ascontiguousarray(wav_16k, dtype=np.float32))
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, 80), dtype=np.float32)
    return np.stack([np.asarray(fb.get_frame(i), dtype=np.float32) for i in range(n)])


def prompt_mel_spectrogram(wav_24k: np.ndarray) -> np.ndarray:
    """The flow's 80-bin log-mel [N // 480, 80] of 24 kHz audio (spec section 3.3)."""
    import torch

    y = torch.from_numpy(np.ascontiguousarray(wav_24k, dtype=np.float32)).view(1, 1, -1)
    pad = (PROMPT_N_FFT - PROMPT_HOP) // 2
    if y.shape[-1] <= pad:
        raise InvalidAudio(f"audio is too short for a prompt mel ({y.shape[-1]} samples at 24 kHz)")
    y = torch.nn.functional.pad(y, (pad, pad), mode="reflect").view(1, -1)
    window = torch.hann_window(PROMPT_WIN)
    spec = torch.stft(y, PROMPT_N_FFT, hop_length=PROMPT_HOP, win_length=PROMPT_WIN, window=window,
                      center=False, normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)                      # [1, 961, T]
    basis = torch.from_numpy(mel_filters(SR_24K, PROMPT_N_FFT, MEL_BINS, PROMPT_FMIN, PROMPT_FMAX).copy())
    mel = torch.log(torch.clamp(basis @ mag, min=1e-5))               # [1, 80, T]
    return mel[0].T.contiguous().numpy()


def fit_prompt_mel(mel: np.ndarray, n_tokens: int) -> np.ndarray:
    """Pad by replicating the last frame, or cut, to exactly ``2 * n_tokens`` frames."""
    want = TOKEN_MEL_RATIO * int(n_tokens)
    if mel.shape[0] == 0:
        raise InvalidAudio("the prompt mel has no frames")
    if mel.shape[0] >= want:
        return np.ascontiguousarray(mel[:want], dtype=np.float32)
    tail = np.repeat(mel[-1:], want - mel.shape[0], axis=0)
    return np.ascontiguousarray(np.concatenate([mel, tail], axis=0), dtype=np.float32)


# ----------------------------------------------------------------------------- audio in
def _as_float_array(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise InvalidAudio(f"{what} must be 1-D mono audio, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidAudio(f"{what} must hold floats in [-1, 1], got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise InvalidAudio(f"{what} contains no samples")
    if not np.isfinite(arr).all():
        raise InvalidAudio(f"{what} contains non-finite samples (NaN or Inf)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _decode_channels(src: AudioSource) -> tuple[np.ndarray, np.ndarray, int]:
    """(first channel, channel mean, rate) of an audio file/bytes; the reference tokenizes
    and embeds the first channel (``s3tokenizer.load_audio``) and averages channels for
    the prompt mel."""
    first, sr = decode_audio(src, max_seconds=MAX_DECODE_SECONDS)     # validates; our error taxonomy
    if isinstance(src, (str, os.PathLike)):
        data: object = str(src)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = io.BytesIO(bytes(src))
    else:
        return first, first, sr                                       # a stream: already consumed
    import soundfile as sf

    try:
        x, _ = sf.read(data, dtype="float32", always_2d=True)
    except Exception:                      # decoded once already; keep the first channel
        return first, first, sr
    return first, np.ascontiguousarray(x.mean(axis=1), dtype=np.float32), sr


# ----------------------------------------------------------------------------- encoder
def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent} (needed to make voices from audio)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CheckpointError(f"{path.name} could not be loaded by onnxruntime: {e}") from None


def _check_io(sess, path: Path, inputs: list[tuple[str, int]], n_outputs: int) -> list[str]:
    """Input names in order, checked by element type and rank; raises naming the file."""
    got = sess.get_inputs()
    if len(got) != len(inputs) or len(sess.get_outputs()) < n_outputs:
        raise CheckpointError(f"{path.name}: expected {len(inputs)} input(s) and {n_outputs} output(s), got "
                              f"inputs {[i.name for i in got]} and outputs {[o.name for o in sess.get_outputs()]}")
    names = []
    for arg, (kind, rank) in zip(got, inputs):
        if arg.type != kind or (arg.shape is not None and len(arg.shape) != rank):
            raise CheckpointError(f"{path.name}: input {arg.name!r} is {arg.type} {arg.shape}; expected "
                                  f"{kind} of rank {rank}")
        names.append(arg.name)
    return names


class VoiceEncoder:
    """CAM++ speaker embedding + S3 tokenizer v2 + prompt mel for one ``token2wav/`` folder."""

    def __init__(self, folder: str | Path, num_threads: int | None = None):
        self.folder = Path(folder)
        camp_path, tok_path = self.folder / CAMPPLUS_ONNX, self.folder / TOKENIZER_ONNX
        self._camp = _session(camp_path, num_threads or 1)
        self._tok = _session(tok_path, num_threads or 1)
        (self._camp_in,) = _check_io(self._camp, camp_path, [("tensor(float)", 3)], 1)
        self._camp_out = self._camp.get_outputs()[0].name
        self._tok_feats, self._tok_len = _check_io(self._tok, tok_path,
                                                   [("tensor(float)", 3), ("tensor(int32)", 1)], 1)
        self._tok_out = self._tok.get_outputs()[0].name
        self._tok_len_dtype = np.int32
        shape = self._camp.get_inputs()[0].shape
        if isinstance(shape[-1], int) and shape[-1] != 80:
            raise CheckpointError(f"{camp_path.name}: input {self._camp_in!r} takes {shape[-1]} bins, expected 80")
        shape = self._tok.get_inputs()[0].shape
        if isinstance(shape[1], int) and shape[1] != TOKENIZER_MELS:
            raise CheckpointError(f"{tok_path.name}: input {self._tok_feats!r} takes {shape[1]} mels, "
                                  f"expected {TOKENIZER_MELS}")

    @classmethod
    def from_pretrained(cls, path: str | Path, num_threads: int | None = None) -> VoiceEncoder:
        """``path``: the ``token2wav/`` folder or a model folder holding it; ``num_threads``:
        ONNX Runtime intra-op threads (default 1)."""
        p = Path(path)
        if not (p / CAMPPLUS_ONNX).is_file() and ((p / "token2wav" / CAMPPLUS_ONNX).is_file()
                                                  or (p / "token2wav" / FLOW_YAML).is_file()):
            p = p / "token2wav"
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a folder")
        return cls(p, num_threads)

    # ------------------------------------------------------------------ pieces
    def speaker_embedding(self, wav_16k) -> np.ndarray:
        """CAM++ embedding [192] float32 of 16 kHz mono audio."""
        wav = _as_float_array(wav_16k, "wav_16k")
        feat = kaldi_fbank(wav)
        if feat.shape[0] < 1:
            raise InvalidAudio(f"audio is too short for a speaker embedding ({wav.shape[0]} samples)")
        feat = feat - feat.mean(axis=0, keepdims=True)
        out = self._camp.run([self._camp_out], {self._camp_in: feat[None].astype(np.float32)})[0]
        emb = np.asarray(out, dtype=np.float32).reshape(-1)
        if emb.shape[0] != SPEAKER_DIM:
            raise CheckpointError(f"{CAMPPLUS_ONNX} returned {emb.shape[0]} values, expected {SPEAKER_DIM}")
        return emb

    def prompt_tokens(self, wav_16k) -> np.ndarray:
        """25 Hz speech codes (int32, 1-D) of 16 kHz mono audio."""
        wav = _as_float_array(wav_16k, "wav_16k")
        mel = tokenizer_log_mel(wav)                                      # [128, F]
        if mel.shape[1] < 1:
            raise InvalidAudio(f"audio is too short to tokenize ({wav.shape[0]} samples)")
        out = self._tok.run([self._tok_out], {self._tok_feats: mel[None].astype(np.float32),
                                              self._tok_len: np.array([mel.shape[1]], dtype=self._tok_len_dtype)})[0]
        codes = np.asarray(out)
        if not np.issubdtype(codes.dtype, np.integer):
            raise CheckpointError(f"{TOKENIZER_ONNX} returned {codes.dtype} codes, expected integers")
        codes = codes.reshape(-1).astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= SPEECH_VOCAB):
            raise CheckpointError(f"{TOKENIZER_ONNX} returned codes outside [0, {SPEECH_VOCAB})")
        return codes.astype(np.int32)

    def prompt_mel(self, wav, sr: int = SR_16K, n_tokens: int | None = None) -> np.ndarray:
        """Prompt mel [T, 80] float32 of mono audio at ``sr`` (resampled to 24 kHz); with
        ``n_tokens``, padded by replication / cut to exactly ``2 * n_tokens`` frames."""
        x = _as_float_array(wav, "wav")
        mel = prompt_mel_spectrogram(resample(x, sr, SR_24K))
        return mel if n_tokens is None else fit_prompt_mel(mel, n_tokens)

    # ------------------------------------------------------------------ a voice
    def encode(self, audio, sr: int | None = None, *, voice_id: str | None = None, name: str = "",
               description: str = "") -> Voice:
        """A :class:`Voice` from a reference recording: a path, WAV/FLAC/OGG bytes, or a
        1-D float array (then ``sr`` is required).

        Raises :class:`InvalidAudio` for non-audio, shorter than 1 s, silent (RMS below
        -60 dBFS) or non-finite input; clips longer than 30 s are TRIMMED to their first
        30 s (the S3 tokenizer takes at most 30 s); files longer than 600 s are refused
        (:class:`AudioTooLarge`). ``voice_id`` defaults to ``voice-`` + a hash of the audio.
        """
        is_file = isinstance(audio, (bytes, bytearray, memoryview, str, os.PathLike)) or hasattr(audio, "read")
        if not is_file:                                    # samples: numpy array, list, tensor...
            if sr is None:
                raise InvalidArgument("the sample rate is required when audio is an array", field="sr")
            if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or int(sr) <= 0:
                raise InvalidArgument(f"the sample rate must be a positive integer, got {sr!r}", field="sr")
            rate = int(sr)
            first = mean = _as_float_array(audio, "audio")
        else:
            first, mean, rate = _decode_channels(audio)
        seconds = first.shape[0] / rate
        if seconds < MIN_SECONDS:
            raise InvalidAudio(f"reference audio is {seconds:.2f} s long; a voice needs at least "
                               f"{MIN_SECONDS:g} s of speech")
        limit = int(MAX_SECONDS * rate)
        first, mean = first[:limit], mean[:limit]              # > 30 s: keep the first 30 s
        rms = float(np.sqrt(np.mean(np.square(first.astype(np.float64)))))
        if rms < SILENCE_RMS:
            db = 20 * math.log10(rms) if rms > 0 else float("-inf")
            raise InvalidAudio(f"reference audio is silent (RMS {db:.1f} dBFS, below the "
                               f"{20 * math.log10(SILENCE_RMS):.0f} dBFS floor)")
        wav16 = resample(first, rate, SR_16K)
        tokens = self.prompt_tokens(wav16)
        if tokens.shape[0] < 1:
            raise InvalidAudio("reference audio produced no speech tokens")
        emb = self.speaker_embedding(wav16)
        mel = self.prompt_mel(mean, rate, n_tokens=tokens.shape[0])
        if voice_id is None:
            voice_id = "voice-" + hashlib.sha256(first.tobytes()).hexdigest()[:16]
        return Voice(voice_id=check_voice_id(voice_id), name=name or voice_id, description=description,
                     prompt_tokens=tokens, prompt_mel=mel, speaker_embedding=emb, created=utc_now())
