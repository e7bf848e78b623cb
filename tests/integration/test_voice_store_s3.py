"""The voice library on a REAL S3 server (SeaweedFS), through S3VoiceStore (minio client)."""
import uuid

import numpy as np
import pytest

from stepaudio2.runtime.errors import InvalidArgument, NotFound
from stepaudio2.runtime.voice_store import (ASSETS_VOICES, CachedVoiceStore, S3VoiceStore, Voice,
                                            VoiceStoreSettings, ensure_builtin_voices, open_voice_store)
from tests.integration.s3 import s3_server  # noqa: F401  (pytest fixture)


@pytest.fixture(scope="module")
def encoder(tiny_ckpt):
    from stepaudio2.model.token2wav.features import VoiceEncoder

    return VoiceEncoder.from_pretrained(tiny_ckpt)


def _voice(vid: str, n: int = 7, seed: int = 0) -> Voice:
    rng = np.random.default_rng(seed)
    return Voice(voice_id=vid, name=f"Voice {vid}", description="test voice",
                 prompt_tokens=rng.integers(0, 6561, n), prompt_mel=rng.standard_normal((2 * n, 80)),
                 speaker_embedding=rng.standard_normal(192))


@pytest.fixture
def store(s3_server):
    return S3VoiceStore(s3_server.client(), "voices-test", prefix=f"run-{uuid.uuid4().hex[:8]}/voices")


def test_put_get_list_delete(store):
    assert store.list() == []
    a, b = _voice("alice", seed=1), _voice("bob_2", n=3, seed=2)
    store.put(a, b"RIFF-alice")
    store.put(b, b"RIFF-bob")
    assert store.list() == ["alice", "bob_2"]
    got = store.get("alice")
    assert (got.voice_id, got.name, got.description, got.created) == (a.voice_id, a.name, a.description, a.created)
    np.testing.assert_array_equal(got.prompt_tokens, a.prompt_tokens)
    np.testing.assert_array_equal(got.prompt_mel, a.prompt_mel)
    np.testing.assert_array_equal(got.speaker_embedding, a.speaker_embedding)
    assert store.reference("bob_2") == b"RIFF-bob"
    assert store.exists("alice") and not store.exists("carol")

    store.put(_voice("alice", n=4, seed=9), b"RIFF-alice-2")           # replace
    assert store.get("alice").prompt_tokens.shape == (4,)
    assert store.reference("alice") == b"RIFF-alice-2"

    store.delete("alice")
    assert store.list() == ["bob_2"]
    with pytest.raises(NotFound, match="'alice'"):
        store.get("alice")
    with pytest.raises(NotFound, match="'alice'"):
        store.delete("alice")
    with pytest.raises(NotFound, match="'nobody'"):
        store.reference("nobody")
    with pytest.raises(InvalidArgument, match="invalid voice id"):
        store.get("Not/OK")


def test_prefixes_are_isolated(s3_server, store):
    other = S3VoiceStore(s3_server.client(), "voices-test", prefix=f"other-{uuid.uuid4().hex[:8]}")
    store.put(_voice("shared"), b"x")
    assert other.list() == [] and store.list() == ["shared"]


def test_settings_open_a_cached_s3_store(s3_server, monkeypatch):
    monkeypatch.setenv("STEPAUDIO2_VOICES_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("STEPAUDIO2_VOICES_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("STEPAUDIO2_VOICES_S3_SECRET_KEY", s3_server.secret_key)
    monkeypatch.setenv("STEPAUDIO2_VOICES_S3_BUCKET", "voices-settings")
    monkeypatch.setenv("STEPAUDIO2_VOICES_S3_PREFIX", f"p-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("STEPAUDIO2_VOICES_CACHE_ITEMS", "4")
    s = open_voice_store(VoiceStoreSettings())
    assert isinstance(s, CachedVoiceStore) and isinstance(s.store, S3VoiceStore)
    s.put(_voice("v1"), b"wav")
    assert s.list() == ["v1"] and s.get("v1").voice_id == "v1"


def test_voice_round_trip_feeds_token2wav(store, encoder, tiny_ckpt):
    from stepaudio2.model.token2wav import Token2Wav

    wav = (ASSETS_VOICES / "default_male.wav").read_bytes()
    voice = encoder.encode(wav, voice_id="male_copy", name="Male copy")
    store.put(voice, wav)
    got = store.get("male_copy")
    assert got.prompt_mel.shape == (2 * got.prompt_tokens.shape[0], 80)
    t2w = Token2Wav.from_pretrained(tiny_ckpt)
    tokens = np.arange(10) * 37 % 6561
    mel = t2w.flow_offline(tokens, got.prompt_tokens, got.prompt_mel, got.speaker_embedding)
    assert tuple(mel.shape) == (80, 20) and bool(mel.isfinite().all())
    ref = t2w.flow_offline(tokens, voice.prompt_tokens, voice.prompt_mel, voice.speaker_embedding)
    assert bool((mel == ref).all())            # the stored voice is the computed one, bit for bit


def test_builtin_voices_registered_once(store, encoder):
    assert sorted(ensure_builtin_voices(store, encoder)) == ["default_female", "default_male"]
    assert ensure_builtin_voices(store, encoder) == []
    assert store.list() == ["default_female", "default_male"]
    assert store.reference("default_female") == (ASSETS_VOICES / "default_female.wav").read_bytes()
