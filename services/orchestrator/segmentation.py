"""Cut long audio into <= 25 s segments at quiet points, for transcription.

The encoder takes one <= 25 s chunk per `<audio_start>...<audio_end>` run (spec §1.2). A
fixed 25 s grid cuts words in half; instead each cut goes to the quietest stretch of the
last few seconds before the 25 s limit: the audio is measured in 25 ms frames (RMS), the
frames within a hair of the minimum form runs, and the cut is the middle of the longest
such run (a pause), the latest one on ties. A segment never exceeds the limit, and the
cut also leaves at least ``min_seconds`` for what follows, so no near-empty tail segment
(one too short for an audio patch) is produced.
"""
from __future__ import annotations

import numpy as np

from stepaudio2.model.audio import CHUNK_SECONDS, SAMPLE_RATE

MAX_SEGMENT_SECONDS = float(CHUNK_SECONDS)  # one encoder chunk (spec §1.2)
SEARCH_SECONDS = 5.0                         # where to look for a pause before the limit
FRAME_SECONDS = 0.025                        # RMS frame length
MIN_SEGMENT_SECONDS = 1.0                    # shortest tail a cut may leave behind
# Frames whose RMS is within this of the window's minimum count as equally quiet.
_QUIET_REL = 1e-3
_QUIET_ABS = 1e-6


def frame_rms(x: np.ndarray, frame: int) -> np.ndarray:
    """RMS of consecutive non-overlapping frames of ``frame`` samples (last partial one dropped)."""
    n = len(x) // frame
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    f = np.asarray(x[: n * frame], dtype=np.float64).reshape(n, frame)
    return np.sqrt(np.mean(f * f, axis=1))


def _quietest_cut(window: np.ndarray, frame: int) -> int:
    """Offset into ``window`` of the middle of its longest quietest run of frames."""
    rms = frame_rms(window, frame)
    if rms.size == 0:
        return len(window)
    quiet = rms <= rms.min() * (1 + _QUIET_REL) + _QUIET_ABS
    best_start, best_len = 0, 0
    i = 0
    while i < len(quiet):
        if quiet[i]:
            j = i
            while j < len(quiet) and quiet[j]:
                j += 1
            if j - i >= best_len:  # >=: the latest run wins ties (longer segments)
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    return (best_start * frame) + (best_len * frame) // 2


def segment_audio(x: np.ndarray, sr: int = SAMPLE_RATE, *, max_seconds: float = MAX_SEGMENT_SECONDS,
                  search_seconds: float = SEARCH_SECONDS, frame_seconds: float = FRAME_SECONDS,
                  min_seconds: float = MIN_SEGMENT_SECONDS) -> list[tuple[int, int]]:
    """``(start_sample, end_sample)`` of each segment, covering ``x`` in order without gaps.

    Audio of at most ``max_seconds`` is one segment (an empty input gives none). Every
    segment is at most ``max_seconds`` long.
    """
    n = len(x)
    if n == 0:
        return []
    max_len = int(max_seconds * sr)
    search = min(int(search_seconds * sr), max_len - 1)
    frame = max(1, int(round(frame_seconds * sr)))
    min_tail = int(min_seconds * sr)
    if max_len <= 0 or search <= 0:
        raise ValueError("max_seconds and search_seconds must be positive")
    segments: list[tuple[int, int]] = []
    start = 0
    while n - start > max_len:
        hi = min(start + max_len, n - min_tail)       # never past the limit; leave a real tail
        lo = max(start + 1, start + max_len - search)
        if hi <= lo:                                   # window squeezed away: cut at the limit
            cut = start + max_len
        else:
            cut = lo + _quietest_cut(x[lo:hi], frame)
            cut = min(max(cut, lo), hi)
        segments.append((start, cut))
        start = cut
    segments.append((start, n))
    return segments
