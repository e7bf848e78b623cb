"""Token2WavService: many token2wav streams behind one execute() (the Triton token2wav model's
core), on the tiny random checkpoint and the built-in voices of a local voice library.

Protocol (spec §3.6): a stream's chunks are 28 codes (25 new + 3 lookahead); the next
chunk re-sends the last 3; the final chunk (end=True) is the remainder.
"""
import numpy as np
import pytest
import torch

from stepaudio2.model.token2wav.api import Token2Wav
from stepaudio2.model.token2wav.serving import Token2WavService
from stepaudio2.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from stepaudio2.runtime.triton_params import ChunkRequest
from stepaudio2.runtime.voice_store import LocalVoiceStore, ensure_builtin_voices

SEED = 1234
VOCAB = 6561
SAMPLES_PER_CODE = 960          # 24 kHz / 25 codes per second
CHUNK, LOOKAHEAD = 25, 3
FEMALE, MALE = "default_female", "default_male"


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def t2w(tiny_ckpt):
    return Token2Wav.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def voices(tiny_ckpt, tmp_path_factory):
    from stepaudio2.model.token2wav.features import VoiceEncoder

    store = LocalVoiceStore(tmp_path_factory.mktemp("voices"))
    assert sorted(ensure_builtin_voices(store, VoiceEncoder.from_pretrained(tiny_ckpt))) == [FEMALE, MALE]
    return store


def codes(n: int, seed: int = 0) -> np.ndarray:
    np.random.seed(seed)
    return np.random.randint(0, VOCAB, size=n).astype(np.int64)


def protocol(c: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """(tokens, end) per chunk, by the 25 + 3 protocol."""
    out, i = [], 0
    while len(c) - i >= CHUNK + LOOKAHEAD:
        out.append((c[i: i + CHUNK + LOOKAHEAD], False))
        i += CHUNK
    out.append((c[i:], True))
    return out


def solo(t2w, voices, voice_id: str, c: np.ndarray, seed: int = SEED) -> list[np.ndarray]:
    v = voices.get(voice_id)
    s = t2w.stream(v.prompt_tokens, v.prompt_mel, v.speaker_embedding,
                   generator=torch.Generator().manual_seed(seed))
    return [s.push(tok, last=end).numpy() for tok, end in protocol(c)]


def requests_for(stream_id, voice_id, c, seed=SEED) -> list[ChunkRequest]:
    return [ChunkRequest(stream_id=stream_id, tokens=tok, start=(k == 0), end=end,
                         voice=voice_id if k == 0 else None, seed=seed if k == 0 else None)
            for k, (tok, end) in enumerate(protocol(c))]


def ok(result) -> np.ndarray:
    assert isinstance(result, np.ndarray), f"expected audio, got {result!r}"
    assert result.dtype == np.float32 and result.ndim == 1
    return result


# ----------------------------------------------------------------------------- one stream
def test_protocol_helper():
    chunks = protocol(np.arange(80))
    assert [len(t) for t, _ in chunks] == [28, 28, 28, 5]
    assert [e for _, e in chunks] == [False, False, False, True]
    assert list(chunks[1][0][:3]) == list(chunks[0][0][-3:])


def test_one_stream_matches_token2wav_stream(t2w, voices):
    c = codes(80)
    ref = solo(t2w, voices, FEMALE, c)
    svc = Token2WavService(t2w, voices)
    got = []
    for k, r in enumerate(requests_for(7, FEMALE, c)):
        (res,) = svc.execute([r])
        got.append(ok(res))
        assert svc.live_streams == (0 if r.end else 1)
    assert [g.shape for g in got] == [x.shape for x in ref]
    for g, x in zip(got, ref):
        np.testing.assert_allclose(g, x, rtol=0, atol=1e-5)
    assert all(np.abs(g).max() <= 1.0 for g in got)
    assert sum(g.size for g in got) == c.size * SAMPLES_PER_CODE
    s = svc.stats()
    assert s.started == 1 and s.finished == 1 and s.cancelled == 0 and s.live == 0


@pytest.mark.parametrize("n", [10, 28, 53, 61])
def test_total_samples_is_960_per_code(t2w, voices, n):
    svc = Token2WavService(t2w, voices)
    out = [ok(r) for req in requests_for(1, MALE, codes(n, seed=n)) for r in svc.execute([req])]
    assert sum(o.size for o in out) == n * SAMPLES_PER_CODE
    assert svc.live_streams == 0


def test_the_seed_makes_a_stream_reproducible_and_matters(t2w, voices):
    c = codes(53, seed=3)

    def run(seed):
        svc = Token2WavService(t2w, voices)
        return np.concatenate([ok(r) for req in requests_for(1, FEMALE, c, seed=seed) for r in svc.execute([req])])

    a, b, other = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert a.shape == other.shape and not np.allclose(a, other, atol=1e-4)


def test_start_without_tokens_opens_the_stream(t2w, voices):
    c = codes(30, seed=4)
    ref = solo(t2w, voices, FEMALE, c)
    svc = Token2WavService(t2w, voices)
    (res,) = svc.execute([ChunkRequest(stream_id=3, tokens=np.zeros(0, np.int64), start=True, voice=FEMALE,
                                       seed=SEED)])
    assert ok(res).size == 0 and svc.live_streams == 1
    got = [ok(svc.execute([ChunkRequest(stream_id=3, tokens=tok, end=end)])[0]) for tok, end in protocol(c)]
    for g, x in zip(got, ref):
        np.testing.assert_allclose(g, x, rtol=0, atol=1e-5)
    assert svc.live_streams == 0


# ----------------------------------------------------------------------------- many streams
def test_two_streams_with_different_voices_batched_match_their_solo_runs(t2w, voices):
    ca, cb = codes(80, seed=10), codes(60, seed=11)
    ref_a, ref_b = solo(t2w, voices, FEMALE, ca), solo(t2w, voices, MALE, cb)
    ra, rb = requests_for(101, FEMALE, ca), requests_for(202, MALE, cb)
    assert len(ra) == 4 and len(rb) == 3           # b ends while a goes on
    svc = Token2WavService(t2w, voices)
    got_a, got_b = [], []
    for k in range(max(len(ra), len(rb))):
        batch = ([ra[k]] if k < len(ra) else []) + ([rb[k]] if k < len(rb) else [])
        res = svc.execute(batch)
        assert len(res) == len(batch)
        if k < len(ra):
            got_a.append(ok(res[0]))
        if k < len(rb):
            got_b.append(ok(res[-1]))
        if k == 0:
            assert svc.live_streams == 2
    assert svc.live_streams == 0
    for got, ref in ((got_a, ref_a), (got_b, ref_b)):
        assert [g.shape for g in got] == [x.shape for x in ref]
        for g, x in zip(got, ref):
            assert np.abs(g - x).max() <= 1e-2
    # the voices really differ: a leak of one stream's state into the other would show
    assert not np.allclose(got_a[0][:1000], got_b[0][:1000], atol=1e-2)
    s = svc.stats()
    assert s.started == 2 and s.finished == 2 and s.max_live == 2


# ----------------------------------------------------------------------------- lifecycle
def test_cancel_frees_the_stream(t2w, voices):
    svc = Token2WavService(t2w, voices)
    first = requests_for(5, FEMALE, codes(60))[0]
    ok(svc.execute([first])[0])
    assert svc.live_streams == 1
    (res,) = svc.execute([ChunkRequest(stream_id=5, tokens=np.zeros(0, np.int64), cancel=True)])
    assert ok(res).size == 0
    assert svc.live_streams == 0 and svc.stats().cancelled == 1
    (res,) = svc.execute([ChunkRequest(stream_id=5, tokens=codes(28))])
    assert isinstance(res, FailedPrecondition)


def test_idle_stream_expires_with_a_fake_clock(t2w, voices):
    clock = FakeClock()
    svc = Token2WavService(t2w, voices, idle_timeout_s=5.0, clock=clock)
    reqs = requests_for(9, MALE, codes(60))
    ok(svc.execute([reqs[0]])[0])
    clock.t += 4.0
    assert svc.expire_idle() == [] and svc.live_streams == 1
    ok(svc.execute([reqs[1]])[0])                   # a chunk refreshes the stream
    clock.t += 4.0
    assert svc.expire_idle() == [] and svc.live_streams == 1
    clock.t += 1.5
    assert svc.expire_idle() == [9]
    assert svc.live_streams == 0 and svc.stats().expired == 1
    (res,) = svc.execute([reqs[2]])
    assert isinstance(res, FailedPrecondition)
    assert "not open" in str(res)


def test_close_drops_every_stream(t2w, voices):
    svc = Token2WavService(t2w, voices)
    svc.execute([requests_for(1, FEMALE, codes(60))[0], requests_for(2, MALE, codes(60))[0]])
    assert svc.live_streams == 2
    svc.close()
    assert svc.live_streams == 0 and svc.stats().cancelled == 2


# ----------------------------------------------------------------------------- errors
def test_unknown_voice_fails_only_its_request(t2w, voices):
    c = codes(28 + 5, seed=2)
    ref = solo(t2w, voices, FEMALE, c)
    svc = Token2WavService(t2w, voices)
    good = requests_for(1, FEMALE, c)
    bad = ChunkRequest(stream_id=2, tokens=c[:28], start=True, voice="nobody_here", seed=SEED)
    res = svc.execute([bad, good[0]])
    assert isinstance(res[0], NotFound) and "nobody_here" in str(res[0])
    np.testing.assert_allclose(ok(res[1]), ref[0], rtol=0, atol=1e-5)
    assert svc.live_streams == 1 and 2 not in svc.table
    np.testing.assert_allclose(ok(svc.execute([good[1]])[0]), ref[1], rtol=0, atol=1e-5)
    assert svc.live_streams == 0


@pytest.mark.parametrize("voice", [None, "", "Not A Valid Id!"])
def test_start_without_a_usable_voice_is_invalid(t2w, voices, voice):
    svc = Token2WavService(t2w, voices)
    (res,) = svc.execute([ChunkRequest(stream_id=4, tokens=codes(28), start=True, voice=voice)])
    assert isinstance(res, InvalidArgument)
    assert svc.live_streams == 0


def test_chunk_for_a_stream_never_opened(t2w, voices):
    svc = Token2WavService(t2w, voices)
    res = svc.execute([ChunkRequest(stream_id=77, tokens=codes(28)),
                       ChunkRequest(stream_id=78, tokens=codes(5), end=True)])
    assert all(isinstance(r, FailedPrecondition) for r in res)
    assert svc.live_streams == 0


@pytest.mark.parametrize("bad_code", [7000, VOCAB, -1])
def test_out_of_range_codes_fail_and_drop_the_stream(t2w, voices, bad_code):
    c = codes(60, seed=5)
    svc = Token2WavService(t2w, voices)
    ra, rb = requests_for(1, FEMALE, c), requests_for(2, MALE, c)
    svc.execute([ra[0], rb[0]])
    assert svc.live_streams == 2
    bad_tokens = ra[1].tokens.copy()
    bad_tokens[10] = bad_code
    res = svc.execute([ChunkRequest(stream_id=1, tokens=bad_tokens), rb[1]])
    assert isinstance(res[0], InvalidArgument)
    ok(res[1])
    assert svc.live_streams == 1 and 1 not in svc.table
    assert isinstance(svc.execute([ra[2]])[0], FailedPrecondition)


def test_out_of_range_codes_on_start(t2w, voices):
    svc = Token2WavService(t2w, voices)
    (res,) = svc.execute([ChunkRequest(stream_id=1, tokens=np.full(28, 7000), start=True, voice=FEMALE)])
    assert isinstance(res, InvalidArgument) and svc.live_streams == 0


def test_short_chunk_that_is_not_the_last_is_invalid(t2w, voices):
    svc = Token2WavService(t2w, voices)
    (res,) = svc.execute([ChunkRequest(stream_id=1, tokens=codes(2), start=True, voice=FEMALE)])
    assert isinstance(res, InvalidArgument) and svc.live_streams == 0


def test_float_tokens_are_invalid(t2w, voices):
    svc = Token2WavService(t2w, voices)
    (res,) = svc.execute([ChunkRequest(stream_id=1, tokens=codes(28).astype(np.float32), start=True,
                                       voice=FEMALE)])
    assert isinstance(res, InvalidArgument) and svc.live_streams == 0


def test_max_streams_exceeded(t2w, voices):
    svc = Token2WavService(t2w, voices, max_streams=2)
    firsts = [requests_for(i, FEMALE, codes(60, seed=i))[0] for i in (1, 2, 3)]
    res = svc.execute(firsts)
    ok(res[0]), ok(res[1])
    assert isinstance(res[2], ResourceExhausted)
    assert svc.live_streams == 2 and svc.stats().refused == 1
    # after one ends, there is room again
    svc.execute([ChunkRequest(stream_id=1, tokens=np.zeros(0, np.int64), cancel=True)])
    ok(svc.execute([firsts[2]])[0])
    assert svc.live_streams == 2


def test_two_chunks_of_one_stream_in_one_batch_are_refused(t2w, voices):
    r = requests_for(1, FEMALE, codes(60))
    svc = Token2WavService(t2w, voices)
    res = svc.execute([r[0], r[1]])
    assert isinstance(res[1], InvalidArgument)


def test_prompt_cache_is_bounded(t2w, voices):
    svc = Token2WavService(t2w, voices, prompt_cache_items=1)
    svc.execute([requests_for(1, FEMALE, codes(10))[0], requests_for(2, MALE, codes(10))[0]])
    assert list(svc._prompt_cache) == [MALE]
    svc0 = Token2WavService(t2w, voices, prompt_cache_items=0)
    ok(svc0.execute([requests_for(1, FEMALE, codes(10))[0]])[0])
    assert len(svc0._prompt_cache) == 0


# ----------------------------------------------------------------------------- batch fallback
def test_failed_batch_fallback_keeps_an_empty_end_chunk(tiny_ckpt, voices):
    # A Token2Wav whose noise buffer covers the first chunk of both streams but not the
    # second of the male one (offsets after the first chunk: female 260, male 250; a chunk
    # of 28 codes needs 56 frames): that chunk fails with InvalidArgument in the batched call.
    t2w = Token2Wav.from_pretrained(tiny_ckpt)
    t2w.flow.rand_noise = t2w.flow.make_noise(0, frames=280).to(t2w.device)
    c = codes(60, seed=8)
    ra, rb = requests_for(1, FEMALE, c[:28]), requests_for(2, MALE, c)
    svc = Token2WavService(t2w, voices)
    res = svc.execute([ra[0], rb[0]])
    ok(res[0]), ok(res[1])
    empty_end = ChunkRequest(stream_id=1, tokens=np.zeros(0, np.int64), end=True)
    solo_t2w = Token2Wav.from_pretrained(tiny_ckpt)
    solo_t2w.flow.rand_noise = solo_t2w.flow.make_noise(0, frames=280).to(solo_t2w.device)   # the same noise
    solo_svc = Token2WavService(solo_t2w, voices)
    ok(solo_svc.execute([ra[0]])[0])
    want = ok(solo_svc.execute([empty_end])[0])     # the held-back tail, 3840 samples
    assert want.size == 3840
    res = svc.execute([empty_end, rb[1]])
    assert isinstance(res[1], InvalidArgument)      # the male chunk fails alone...
    np.testing.assert_allclose(ok(res[0]), want, rtol=0, atol=1e-5)   # ...and the female tail survives


def test_warm_computes_the_prefill_of_known_voices_only(tiny_ckpt, voices):
    svc = Token2WavService(Token2Wav.from_pretrained(tiny_ckpt), voices, prompt_cache_items=4)
    assert svc.warm(["default_female", "nobody", "Bad Id!", "default_male"]) == ["default_female", "default_male"]
    assert sorted(svc._prompt_cache) == ["default_female", "default_male"]
    assert Token2WavService(Token2Wav.from_pretrained(tiny_ckpt), voices, prompt_cache_items=0).warm(
        ["default_female"]) == []


def test_start_with_cancel_warms_the_voice_and_keeps_no_stream(tiny_ckpt, voices):
    svc = Token2WavService(Token2Wav.from_pretrained(tiny_ckpt), voices, prompt_cache_items=4)
    out = svc.execute([ChunkRequest(stream_id=9, tokens=np.zeros(0, np.int64), start=True, cancel=True,
                                    voice="default_male")])
    assert out[0].size == 0 and svc.live_streams == 0
    assert list(svc._prompt_cache) == ["default_male"]
    bad = svc.execute([ChunkRequest(stream_id=10, tokens=np.zeros(0, np.int64), start=True, cancel=True,
                                    voice="nobody")])
    assert isinstance(bad[0], NotFound)
