"""Long-audio segmentation: <= 25 s pieces cut at quiet points."""
import numpy as np
import pytest

from stepaudio2.orchestrator.segmentation import frame_rms, segment_audio

SR = 16_000


def tone(seconds: float, amp: float = 0.5, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def check_cover(segs, n, max_seconds=25.0):
    assert segs[0][0] == 0 and segs[-1][1] == n
    for (a, b), (c, _) in zip(segs, segs[1:]):
        assert b == c
    for a, b in segs:
        assert 0 < b - a <= int(max_seconds * SR)


def test_short_audio_is_one_segment():
    x = tone(25.0)
    assert segment_audio(x) == [(0, len(x))]
    assert segment_audio(tone(3.0)) == [(0, 3 * SR)]
    assert segment_audio(np.zeros(0, np.float32)) == []


def test_cuts_fall_in_the_pause_before_the_limit():
    # 21.5 s speech-like tone, 1 s pause, 20 s tone, 1 s pause at 43.5 s, 10 s tone.
    x = np.concatenate([tone(21.5), quiet(1.0), tone(20.0), quiet(1.0), tone(10.0)])
    segs = segment_audio(x)
    check_cover(segs, len(x))
    assert len(segs) == 3
    first_cut, second_cut = segs[0][1] / SR, segs[1][1] / SR
    assert 21.5 <= first_cut <= 22.5          # inside the first pause
    assert abs(first_cut - 22.0) < 0.05       # its middle
    assert 42.5 <= second_cut <= 43.5 + 1.0 and abs(second_cut - 43.0) < 0.05


def test_quietest_point_wins_over_a_merely_lower_one():
    rng = np.random.default_rng(0)
    loud = lambda s: (0.3 * rng.standard_normal(int(s * SR))).astype(np.float32)
    softer = lambda s: (0.05 * rng.standard_normal(int(s * SR))).astype(np.float32)
    x = np.concatenate([loud(20.5), softer(1.0), loud(2.0), quiet(0.5), loud(10.0)])
    (a, cut), *_ = segment_audio(x)
    assert 23.5 <= cut / SR <= 24.0           # the silent 0.5 s, not the softer noise


def test_never_exceeds_limit_without_pauses_and_no_tiny_tail():
    rng = np.random.default_rng(1)
    x = (0.3 * rng.standard_normal(int(100.02 * SR))).astype(np.float32)
    segs = segment_audio(x)
    check_cover(segs, len(x))
    assert len(segs) >= 5
    assert all(b - a >= SR for a, b in segs)  # the last one too: >= 1 s


def test_tail_just_over_limit_keeps_a_real_tail():
    x = np.concatenate([tone(24.9), quiet(0.1), tone(0.05)])  # 25.05 s, pause near the very end
    segs = segment_audio(x)
    check_cover(segs, len(x))
    assert len(segs) == 2 and segs[1][1] - segs[1][0] >= SR


@pytest.mark.parametrize("seconds", [25.001, 49.99, 50.0, 75.5, 7200 / 60])
def test_silence_and_odd_lengths(seconds):
    x = quiet(seconds)
    segs = segment_audio(x)
    check_cover(segs, len(x))


def test_frame_rms():
    x = np.concatenate([np.ones(400), np.zeros(400), np.full(100, 2.0)])
    assert frame_rms(x, 400).tolist() == [1.0, 0.0]   # the partial last frame is dropped
