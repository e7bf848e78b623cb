"""CachedVoiceStore's time-to-live: cached voices are re-read from the underlying store once
they are older than ``ttl_s`` (another process may have deleted or replaced them)."""
import numpy as np
import pytest

from stepaudio2.runtime.errors import InvalidArgument, NotFound
from stepaudio2.runtime.voice_store import CachedVoiceStore, LocalVoiceStore, Voice

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "          # any non-empty bytes are accepted as the reference


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def voice(vid: str, name: str | None = None) -> Voice:
    return Voice(voice_id=vid, name=name or vid.title(), description="test voice", prompt_tokens=np.arange(10),
                 prompt_mel=np.zeros((20, 80)), speaker_embedding=np.zeros(192))


@pytest.fixture
def setup(tmp_path):
    clock = FakeClock()
    base = LocalVoiceStore(tmp_path / "voices")
    cache = CachedVoiceStore(base, max_items=4, ttl_s=10, clock=clock)
    return cache, base, clock


def test_put_then_get_is_a_cache_hit(setup):
    cache, base, _ = setup
    v = voice("alice")
    cache.put(v, WAV)
    assert base.get("alice").name == "Alice"              # written through
    assert cache.get("alice") is v
    assert (cache.hits, cache.misses) == (1, 0)
    assert base.reference("alice") == WAV == cache.reference("alice")


def test_deleted_underneath_is_served_within_the_ttl_then_not_found(setup):
    cache, base, clock = setup
    cache.put(voice("alice"), WAV)
    base.delete("alice")                                  # another process deletes it
    clock.t += 9.0
    assert cache.get("alice").voice_id == "alice"         # still cached
    clock.t += 1.0                                        # exactly ttl_s old: still fresh (older than = expired)
    assert cache.get("alice").voice_id == "alice"
    clock.t += 0.5
    with pytest.raises(NotFound):
        cache.get("alice")
    assert "alice" not in cache.cached_ids() and len(cache) == 0
    with pytest.raises(NotFound):                         # and stays gone
        cache.get("alice")


def test_replaced_underneath_is_reread_after_the_ttl(setup):
    cache, base, clock = setup
    cache.put(voice("bob", "Old Bob"), WAV)
    base.put(voice("bob", "New Bob"), WAV)
    assert cache.get("bob").name == "Old Bob"
    clock.t += 11
    fresh = cache.get("bob")
    assert fresh.name == "New Bob"
    assert cache.get("bob") is fresh                      # cached again, with a new time stamp
    clock.t += 9
    assert cache.get("bob") is fresh


def test_the_ttl_counts_from_the_read_not_the_last_use(setup):
    cache, base, clock = setup
    base.put(voice("carol"), WAV)
    first = cache.get("carol")                            # a miss: read from the store
    assert cache.misses == 1
    for _ in range(4):                                    # used often, every 2.5 s
        clock.t += 2.5
        assert cache.get("carol") is first
    assert cache.hits == 4
    clock.t += 0.5                                        # 10.5 s after the read
    again = cache.get("carol")
    assert again is not first and again.voice_id == "carol"
    assert cache.misses == 2


def test_without_a_ttl_entries_stay(tmp_path):
    clock = FakeClock()
    base = LocalVoiceStore(tmp_path)
    cache = CachedVoiceStore(base, max_items=4, ttl_s=None, clock=clock)
    cache.put(voice("dave"), WAV)
    base.delete("dave")
    clock.t += 1e9
    assert cache.get("dave").voice_id == "dave"


def test_lru_bound_with_ttl(setup):
    cache, base, clock = setup
    for vid in ("v1", "v2", "v3", "v4"):
        cache.put(voice(vid), WAV)
    cache.get("v1")                                        # v1 is now the most recent
    cache.put(voice("v5"), WAV)
    assert cache.cached_ids() == ["v3", "v4", "v1", "v5"]
    assert len(cache) == 4
    base.delete("v2")                                      # evicted AND deleted: a miss, NotFound
    with pytest.raises(NotFound):
        cache.get("v2")


def test_delete_through_the_cache_is_immediate(setup):
    cache, base, _ = setup
    cache.put(voice("erin"), WAV)
    cache.delete("erin")
    assert "erin" not in cache.cached_ids() and base.list() == []
    with pytest.raises(NotFound):
        cache.get("erin")
    with pytest.raises(NotFound):
        cache.delete("erin")


def test_exists_within_the_ttl(setup):
    cache, base, clock = setup
    cache.put(voice("fay"), WAV)
    assert cache.exists("fay") and not cache.exists("nobody")
    base.delete("fay")
    clock.t += 5
    assert cache.exists("fay")                             # consistent with get() within the ttl


def test_exists_after_the_ttl_sees_a_deletion(setup):
    cache, base, clock = setup
    cache.put(voice("gus"), WAV)
    base.delete("gus")
    clock.t += 11
    assert not cache.exists("gus")


def test_invalid_ids_and_references(setup):
    cache, _, _ = setup
    with pytest.raises(InvalidArgument):
        cache.get("Not Valid")
    for bad in (b"", "RIFF", None, bytearray()):
        with pytest.raises(InvalidArgument) as e:
            cache.put(voice("hal"), bad)
        assert e.value.field == "reference"
    assert cache.cached_ids() == [] and cache.list() == []
    cache.put(voice("hal"), bytearray(b"x"))               # bytes-like of any content is stored as is
    assert cache.reference("hal") == b"x"


def test_bad_max_items(tmp_path):
    with pytest.raises(InvalidArgument):
        CachedVoiceStore(LocalVoiceStore(tmp_path), max_items=0, ttl_s=10)
