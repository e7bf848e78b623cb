"""Voices: features from a reference clip (VoiceEncoder on the tiny ONNX models), the local
voice library, its LRU cache, settings and the built-in voices."""
import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from stepaudio2.runtime.errors import CheckpointError, InvalidArgument, InvalidAudio, NotFound
from stepaudio2.runtime.voice_store import (ASSETS_VOICES, BUILTIN_VOICES, CachedVoiceStore, LocalVoiceStore, Voice,
                                            VoiceStoreSettings, check_voice_id, ensure_builtin_voices,
                                            open_voice_store)


@pytest.fixture(scope="module")
def t2w_dir(tiny_ckpt):
    return tiny_ckpt / "token2wav"


@pytest.fixture(scope="module")
def encoder(t2w_dir):
    from stepaudio2.model.token2wav.features import VoiceEncoder

    return VoiceEncoder.from_pretrained(t2w_dir)


@pytest.fixture(scope="module")
def female():
    x, sr = sf.read(ASSETS_VOICES / "default_female.wav", dtype="float32")
    assert sr == 16000 and x.ndim == 1
    return x


def _wav_bytes(x, sr=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _voice(vid: str, n: int = 5, seed: int = 0) -> Voice:
    rng = np.random.default_rng(seed)
    return Voice(voice_id=vid, name=vid.title(), description="d", prompt_tokens=rng.integers(0, 6561, n),
                 prompt_mel=rng.standard_normal((2 * n, 80)), speaker_embedding=rng.standard_normal(192))


# ----------------------------------------------------------------------------- checkpoint files
def test_tiny_checkpoint_has_complete_token2wav(tiny_ckpt):
    names = {p.name for p in (tiny_ckpt / "token2wav").iterdir()}
    assert names >= {"flow.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2_25hz.onnx"}


def test_tiny_onnx_interfaces_match_the_released_ones(t2w_dir):
    import onnxruntime as ort

    from stepaudio2.model.token2wav.tiny import CAMPPLUS_IO, TOKENIZER_IO

    kinds = {"float32": "tensor(float)", "int32": "tensor(int32)", "int64": "tensor(int64)"}
    for fname, io_spec in (("campplus.onnx", CAMPPLUS_IO), ("speech_tokenizer_v2_25hz.onnx", TOKENIZER_IO)):
        s = ort.InferenceSession(str(t2w_dir / fname), providers=["CPUExecutionProvider"])
        got_in = {a.name: (a.type, tuple(a.shape)) for a in s.get_inputs()}
        got_out = {a.name: (a.type, tuple(a.shape)) for a in s.get_outputs()}
        assert got_in == {k: (kinds[t], shape) for k, (t, shape) in io_spec["inputs"].items()}
        assert got_out == {k: (kinds[t], shape) for k, (t, shape) in io_spec["outputs"].items()}
    assert list(CAMPPLUS_IO["inputs"]) == ["input"] and list(TOKENIZER_IO["inputs"]) == ["feats", "feats_length"]


# ----------------------------------------------------------------------------- features
def test_feature_shapes(encoder, female):
    from stepaudio2.model.token2wav.features import kaldi_fbank, tokenizer_log_mel

    n = female.shape[0]
    assert tokenizer_log_mel(female).shape == (128, n // 160)
    assert kaldi_fbank(female[:16000]).shape == (98, 80)             # (16000 - 400) // 160 + 1
    emb = encoder.speaker_embedding(female)
    assert emb.shape == (192,) and emb.dtype == np.float32 and np.isfinite(emb).all()
    tok = encoder.prompt_tokens(female)
    frames = n // 160
    assert tok.dtype == np.int32 and tok.shape == (-(-(-(-frames // 2)) // 2),)   # two stride-2 convs: ~25 Hz
    assert 0 <= tok.min() and tok.max() < 6561
    mel = encoder.prompt_mel(female, 16000)
    assert mel.shape == (n * 3 // 2 // 480, 80) and np.isfinite(mel).all()
    assert encoder.prompt_mel(female, 16000, n_tokens=len(tok)).shape == (2 * len(tok), 80)


def test_encode_is_deterministic_and_consistent(encoder, female):
    a = encoder.encode(ASSETS_VOICES / "default_female.wav", voice_id="f1", name="F")
    b = encoder.encode(female, 16000, voice_id="f1")
    c = encoder.encode((ASSETS_VOICES / "default_female.wav").read_bytes(), voice_id="f1")
    for v in (b, c):
        np.testing.assert_array_equal(v.prompt_tokens, a.prompt_tokens)
        np.testing.assert_array_equal(v.prompt_mel, a.prompt_mel)
        np.testing.assert_array_equal(v.speaker_embedding, a.speaker_embedding)
    assert a.prompt_mel.shape == (2 * len(a.prompt_tokens), 80)
    assert a.voice_id == "f1" and a.name == "F" and a.created
    male = encoder.encode(ASSETS_VOICES / "default_male.wav")
    assert male.voice_id.startswith("voice-") and not np.allclose(male.speaker_embedding, a.speaker_embedding)


def test_mel_filters_match_the_frontend_and_fmax():
    from stepaudio2.model.frontend import mel_filters as frontend_filters
    from stepaudio2.model.token2wav.features import mel_filters

    np.testing.assert_array_equal(mel_filters(16000, 400, 128), frontend_filters(16000, 400, 128))
    fb = mel_filters(24000, 1920, 80, 0.0, 8000.0)
    assert fb.shape == (80, 961)
    hz = np.fft.rfftfreq(1920, 1 / 24000)
    assert fb[:, hz > 8000].max() == 0 and fb[:, hz < 8000].max() > 0


def test_prompt_mel_matches_the_matcha_formula(female):
    """Independent float64 numpy version of the reference mel_spectrogram (reflect pad 720,
    periodic Hann 1920, hop 480, no centring, sqrt(power + 1e-9), 80 Slaney mels 0-8 kHz,
    log clamp 1e-5), on 24 kHz audio."""
    from stepaudio2.model.token2wav.features import mel_filters, prompt_mel_spectrogram

    rng = np.random.default_rng(0)
    x = (np.sin(np.arange(24000 * 2) * 2 * np.pi * 220 / 24000) * 0.3
         + rng.uniform(-0.1, 0.1, 48000) * np.linspace(0, 1, 48000)).astype(np.float32)
    y = np.pad(x.astype(np.float64), (720, 720), mode="reflect")
    n = 1 + (len(y) - 1920) // 480
    frames = np.stack([y[i * 480:i * 480 + 1920] for i in range(n)])
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1920) / 1920)
    spec = np.fft.rfft(frames * win, axis=1)
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    want = np.log(np.maximum(mag @ mel_filters(24000, 1920, 80, 0.0, 8000.0).astype(np.float64).T, 1e-5))
    got = prompt_mel_spectrogram(x)
    assert got.shape == want.shape == (len(x) // 480, 80)
    loud = want > -8.0            # float32 STFT round-off dominates bins near the 1e-5 floor
    assert loud.mean() > 0.5
    np.testing.assert_allclose(got[loud], want[loud], atol=1e-4)
    np.testing.assert_allclose(got, want, atol=1e-2)


def test_prompt_mel_pads_by_replication_and_trims():
    from stepaudio2.model.token2wav.features import fit_prompt_mel

    mel = np.arange(12, dtype=np.float32).reshape(3, 4).repeat(20, axis=1)
    padded = fit_prompt_mel(mel, 3)
    assert padded.shape == (6, 80)
    np.testing.assert_array_equal(padded[:3], mel)
    np.testing.assert_array_equal(padded[3:], np.repeat(mel[-1:], 3, axis=0))
    np.testing.assert_array_equal(fit_prompt_mel(mel, 1), mel[:2])


def test_bad_clips_are_refused_with_a_reason(encoder, female):
    with pytest.raises(InvalidAudio, match="at least 1 s"):
        encoder.encode(female[:8000], 16000)
    with pytest.raises(InvalidAudio, match="at least 1 s"):
        encoder.encode(_wav_bytes(female[:8000]))
    with pytest.raises(InvalidAudio, match="silent"):
        encoder.encode(np.zeros(32000, np.float32), 16000)
    with pytest.raises(InvalidAudio, match="silent"):
        encoder.encode(_wav_bytes(np.full(32000, 1e-5, np.float32)))
    with pytest.raises(InvalidAudio):                               # UnsupportedAudioFormat (415)
        encoder.encode(b"this is not audio at all, just some text " * 20)
    with pytest.raises(InvalidAudio, match="non-finite"):
        encoder.encode(np.full(32000, np.nan, np.float32), 16000)
    with pytest.raises(InvalidAudio, match="1-D"):
        encoder.encode(np.zeros((2, 32000), np.float32), 16000)
    with pytest.raises(InvalidArgument, match="sample rate"):
        encoder.encode(female)
    with pytest.raises(InvalidArgument, match="invalid voice id"):
        encoder.encode(female, 16000, voice_id="Bad Id")


def test_stereo_reference_as_the_reference_code(encoder, female):
    """First channel for tokens and speaker embedding, channel mean for the prompt mel."""
    x = female[:32000]
    stereo = io.BytesIO()
    sf.write(stereo, np.stack([x, 0.5 * x], axis=1), 16000, format="WAV", subtype="FLOAT")
    v = encoder.encode(stereo.getvalue(), voice_id="st")
    np.testing.assert_array_equal(v.prompt_tokens, encoder.prompt_tokens(x))
    np.testing.assert_array_equal(v.speaker_embedding, encoder.speaker_embedding(x))
    np.testing.assert_allclose(v.prompt_mel, encoder.prompt_mel(0.75 * x, 16000, n_tokens=len(v.prompt_tokens)),
                               atol=1e-5)
    with pytest.raises(InvalidArgument, match="sample rate"):
        encoder.encode(x, 0)


def test_long_clips_are_trimmed_to_30_s(encoder, female):
    long = np.tile(female, int(np.ceil(31 * 16000 / female.shape[0])))[:31 * 16000]
    v = encoder.encode(long, 16000)
    assert len(v.prompt_tokens) == 750                               # 30 s at 25 Hz
    assert v.prompt_mel.shape == (1500, 80)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_missing_or_wrong_onnx_names_the_file(t2w_dir, tmp_path):
    import shutil

    import torch

    from stepaudio2.model.token2wav.features import VoiceEncoder

    d = tmp_path / "t2w"
    shutil.copytree(t2w_dir, d)
    (d / "speech_tokenizer_v2_25hz.onnx").unlink()
    with pytest.raises(CheckpointError, match="speech_tokenizer_v2_25hz.onnx"):
        VoiceEncoder.from_pretrained(d)
    shutil.copy(t2w_dir / "speech_tokenizer_v2_25hz.onnx", d)
    torch.onnx.export(torch.nn.Linear(80, 192), (torch.zeros(1, 80),), str(d / "campplus.onnx"),
                      input_names=["x"], output_names=["y"], dynamo=False)
    with pytest.raises(CheckpointError, match="campplus.onnx"):
        VoiceEncoder.from_pretrained(d)
    (d / "campplus.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match="campplus.onnx"):
        VoiceEncoder.from_pretrained(d)


def test_encoded_voice_drives_token2wav(encoder, t2w_dir):
    from stepaudio2.model.token2wav import Token2Wav

    v = encoder.encode(ASSETS_VOICES / "default_male.wav", voice_id="m")
    t2w = Token2Wav.from_pretrained(t2w_dir)
    mel = t2w.flow_offline([5, 17, 300, 6000], v.prompt_tokens, v.prompt_mel, v.speaker_embedding)
    assert tuple(mel.shape) == (80, 8) and bool(mel.isfinite().all())


# ----------------------------------------------------------------------------- store
@pytest.mark.parametrize("bad", ["", "A", "has space", "a/b", "..", "x" * 65, "é", None, 3])
def test_bad_voice_ids(bad, tmp_path):
    with pytest.raises(InvalidArgument, match="invalid voice id"):
        check_voice_id(bad)
    with pytest.raises(InvalidArgument):
        LocalVoiceStore(tmp_path).get(bad)


def test_voice_validates_shapes():
    with pytest.raises(InvalidArgument, match="2 frames per prompt token"):
        Voice("v", "v", "", np.zeros(3, np.int32), np.zeros((5, 80)), np.zeros(192))
    with pytest.raises(InvalidArgument, match="192"):
        Voice("v", "v", "", np.zeros(3, np.int32), np.zeros((6, 80)), np.zeros(191))
    assert check_voice_id("a" * 64) == "a" * 64 and check_voice_id("default_male-2") == "default_male-2"


def test_local_store_put_get_list_delete(tmp_path):
    store = LocalVoiceStore(tmp_path / "voices")
    assert store.list() == []
    a = _voice("alice", seed=1)
    store.put(a, b"RIFFalice")
    store.put(_voice("bob", n=2, seed=2), b"RIFFbob")
    assert store.list() == ["alice", "bob"]
    got = store.get("alice")
    assert got.metadata() == a.metadata()
    np.testing.assert_array_equal(got.prompt_mel, a.prompt_mel)
    np.testing.assert_array_equal(got.speaker_embedding, a.speaker_embedding)
    assert got.prompt_tokens.dtype == np.int32
    assert sorted(p.name for p in (tmp_path / "voices" / "alice").iterdir()) == \
        ["features.npz", "reference.wav", "voice.json"]
    assert store.reference("bob") == b"RIFFbob"
    store.put(_voice("alice", n=9, seed=3), b"RIFFalice2")                 # replace
    assert store.get("alice").prompt_tokens.shape == (9,) and store.reference("alice") == b"RIFFalice2"
    assert [p.name for p in (tmp_path / "voices").iterdir() if p.name.startswith(".")] == []
    store.delete("alice")
    assert store.list() == ["bob"] and not store.exists("alice")
    for op in (store.get, store.delete, store.reference):
        with pytest.raises(NotFound, match="'alice'"):
            op("alice")
    with pytest.raises(InvalidArgument):
        store.put(_voice("carol"), b"")


def test_lru_cache_is_bounded(tmp_path):
    inner = LocalVoiceStore(tmp_path)
    for i in range(4):
        inner.put(_voice(f"v{i}", seed=i), b"w")
    cache = CachedVoiceStore(inner, max_items=2)
    for vid in ("v0", "v1", "v0", "v2"):          # v1 is least recently used when v2 arrives
        cache.get(vid)
    assert cache.cached_ids() == ["v0", "v2"] and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.get("v0") is cache.get("v0")
    cache.put(_voice("v9"), b"w")
    assert len(cache) == 2 and "v9" in cache.cached_ids()
    cache.delete("v9")
    assert "v9" not in cache.cached_ids() and "v9" not in inner.list()
    with pytest.raises(NotFound):
        cache.get("v9")
    with pytest.raises(InvalidArgument):
        CachedVoiceStore(inner, max_items=0)


def test_settings_pick_the_local_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPAUDIO2_VOICES_LOCAL_FOLDER", str(tmp_path / "lib"))
    monkeypatch.setenv("STEPAUDIO2_VOICES_CACHE_ITEMS", "3")
    monkeypatch.delenv("STEPAUDIO2_VOICES_S3_ENDPOINT", raising=False)
    s = open_voice_store(VoiceStoreSettings())
    assert isinstance(s, CachedVoiceStore) and s.max_items == 3 and isinstance(s.store, LocalVoiceStore)
    assert s.store.folder == tmp_path / "lib"
    monkeypatch.setenv("STEPAUDIO2_VOICES_CACHE_ITEMS", "0")
    assert isinstance(open_voice_store(VoiceStoreSettings()), LocalVoiceStore)


def test_builtin_voices(tmp_path, encoder):
    for vid in BUILTIN_VOICES:
        info = sf.info(str(ASSETS_VOICES / f"{vid}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 3.0 <= info.duration <= 4.5 and (ASSETS_VOICES / f"{vid}.wav").stat().st_size < 150_000
    store = LocalVoiceStore(tmp_path)
    assert sorted(ensure_builtin_voices(store, encoder)) == ["default_female", "default_male"]
    assert ensure_builtin_voices(store, encoder) == []
    v = store.get("default_male")
    assert v.name == "Default male" and v.prompt_mel.shape == (2 * len(v.prompt_tokens), 80)


def test_voice_store_imports_no_torch():
    code = ("import sys, stepaudio2.runtime.voice_store\n"
            "print(','.join(m for m in ('torch', 'onnxruntime', 'kaldi_native_fbank') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_s3_store_unreachable_is_unavailable():
    import socket

    import urllib3
    from minio import Minio

    from stepaudio2.runtime.errors import Unavailable
    from stepaudio2.runtime.voice_store import S3VoiceStore

    with socket.socket() as s:                       # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=2))
    client = Minio(f"127.0.0.1:{port}", access_key="a", secret_key="b", secure=False, region="us-east-1",
                   http_client=http)
    store = S3VoiceStore(client, "voices", create_bucket=False)
    for op in (store.list, lambda: store.get("x"), lambda: store.exists("x"), lambda: store.put(_voice("x"), b"w")):
        with pytest.raises(Unavailable, match="s3://voices"):
            op()
    with pytest.raises(Unavailable):
        S3VoiceStore(client, "voices")
