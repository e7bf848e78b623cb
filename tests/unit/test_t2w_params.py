"""Request parsers of the token2wav / voice_encoder Triton models, the llm's allowed-token and
logit-bias inputs, and the token2wav / voice_encoder entries of the model repository."""
import re

import numpy as np
import pytest

from stepaudio2.runtime.errors import InvalidArgument
from stepaudio2.runtime.model_repo import build_model_repo
from stepaudio2.runtime.triton_params import (ChunkRequest, get_param, model_parameters, parse_llm_request,
                                              parse_t2w_request, parse_voice_request)

TOKENS = np.arange(28, dtype=np.int32)


def strings(*values) -> np.ndarray:
    """A TYPE_STRING tensor as the Python backend hands it over: an object array of bytes."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def t2w(correlation_id=None, **inputs) -> ChunkRequest:
    inputs.setdefault("TOKENS", TOKENS)
    return parse_t2w_request(inputs, correlation_id)


# ----------------------------------------------------------------------------- token2wav
def test_minimal_chunk():
    r = t2w(correlation_id=7)
    assert r == ChunkRequest(stream_id=7, tokens=r.tokens)
    assert r.tokens.dtype == np.int64 and r.tokens.tolist() == list(range(28))
    assert (r.start, r.end, r.cancel, r.voice, r.seed) == (False, False, False, None, None)


def test_corrid_tensor_wins_over_the_correlation_id():
    r = t2w(correlation_id=7, CORRID=np.array([[42]], dtype=np.uint64))
    assert r.stream_id == 42 and isinstance(r.stream_id, int)
    big = t2w(correlation_id=7, CORRID=np.array([2 ** 64 - 1], dtype=np.uint64))
    assert big.stream_id == 2 ** 64 - 1
    # a zero CORRID is not rescued by the argument
    with pytest.raises(InvalidArgument):
        t2w(correlation_id=7, CORRID=np.array([0], dtype=np.uint64))


@pytest.mark.parametrize("cid", [None, 0, ""])
def test_a_request_outside_a_sequence_is_invalid(cid):
    with pytest.raises(InvalidArgument) as e:
        t2w(correlation_id=cid)
    assert e.value.field == "sequence_id"


def test_string_correlation_ids_pass_through():
    assert t2w(correlation_id="abc").stream_id == "abc"


def test_tokens_are_required_and_integer():
    with pytest.raises(InvalidArgument) as e:
        parse_t2w_request({"TOKENS": None}, 3)
    assert e.value.field == "TOKENS"
    for bad in (TOKENS.astype(np.float32), TOKENS.astype(bool), strings(b"1", b"2")):
        with pytest.raises(InvalidArgument) as e:
            t2w(3, TOKENS=bad)
        assert e.value.field == "TOKENS"


def test_tokens_are_flattened_to_int64():
    r = t2w(3, TOKENS=TOKENS.reshape(1, -1))                  # with Triton's batch dimension
    assert r.tokens.shape == (28,) and r.tokens.dtype == np.int64
    assert t2w(3, TOKENS=np.zeros((1, 0), np.int32)).tokens.shape == (0,)
    assert t2w(3, TOKENS=np.array([6560], np.uint16)).tokens.tolist() == [6560]


@pytest.mark.parametrize("name, attr", [("START", "start"), ("END", "end"), ("CANCEL", "cancel")])
def test_flags(name, attr):
    for value, want in [(np.array([1.0], np.float32), True), (np.array([0.0], np.float32), False),
                        (np.array([[1.0]], np.float32), True), (np.array([True]), True),
                        (np.array([False]), False), (np.array([[True]]), True), (None, False)]:
        r = t2w(5, **{name: value})
        assert getattr(r, attr) is want, (name, value)
        others = {"start", "end", "cancel"} - {attr}
        assert not any(getattr(r, o) for o in others)


def test_start_end_together():
    r = t2w(5, START=np.array([1.0], np.float32), END=np.array([1.0], np.float32))
    assert r.start and r.end and not r.cancel


def test_voice():
    assert t2w(5, VOICE=strings(b"default_female")).voice == "default_female"
    assert t2w(5, VOICE=strings(b"default_male").reshape(1, 1)).voice == "default_male"    # batch dim [1, 1]
    assert t2w(5, VOICE=np.array([["default_male"]], dtype=object)).voice == "default_male"
    assert t2w(5, VOICE=strings("caf\u00e9".encode())).voice == "caf\u00e9"   # decoded (validated later)


def test_voice_bad_utf8_or_many():
    with pytest.raises(InvalidArgument) as e:
        t2w(5, VOICE=strings(b"\xff\xfe"))
    assert e.value.field == "VOICE"
    with pytest.raises(InvalidArgument) as e:
        t2w(5, VOICE=strings(b"a", b"b"))
    assert e.value.field == "VOICE"
    with pytest.raises(InvalidArgument):
        t2w(5, VOICE=np.array([], dtype=object))


def test_seed():
    assert t2w(5, SEED=np.array([123], np.int64)).seed == 123
    assert t2w(5, SEED=np.array([[2 ** 62]], np.int64)).seed == 2 ** 62
    assert isinstance(t2w(5, SEED=np.array([7], np.int32)).seed, int)
    for bad in (np.array([1.5], np.float32), np.array([1, 2], np.int64), np.array([], np.int64)):
        with pytest.raises(InvalidArgument) as e:
            t2w(5, SEED=bad)
        assert e.value.field == "SEED"


# ----------------------------------------------------------------------------- voice_encoder
def test_parse_voice_request():
    assert parse_voice_request({"AUDIO": strings(b"RIFFxxxx")}) == b"RIFFxxxx"
    assert parse_voice_request({"AUDIO": np.array([[b"fLaC"]], dtype=object)}) == b"fLaC"
    got = parse_voice_request({"AUDIO": strings(bytearray(b"OggS"))})
    assert got == b"OggS" and type(got) is bytes


@pytest.mark.parametrize("audio", [None, strings(b""), strings("RIFF"), strings(b"a", b"b"),
                                   np.array([], dtype=object)])
def test_parse_voice_request_refuses(audio):
    with pytest.raises(InvalidArgument) as e:
        parse_voice_request({"AUDIO": audio})
    assert e.value.field == "AUDIO"


# ----------------------------------------------------------------------------- llm: allowed ids, logit bias
IDS = np.array([1, 2, 3], np.int32)


def llm(**inputs):
    return parse_llm_request({"INPUT_IDS": IDS, **inputs}, llm_dim=8)


def test_llm_without_the_new_inputs():
    r = llm()
    assert r.input_ids == [1, 2, 3] and "allowed_token_ids" not in r.sampling and "logit_bias" not in r.sampling


def test_allowed_token_ids():
    r = llm(ALLOWED_TOKEN_IDS=np.array([[5, 9, 11]], np.int64))
    assert r.sampling["allowed_token_ids"] == [5, 9, 11]
    assert all(type(i) is int for i in r.sampling["allowed_token_ids"])
    assert llm(ALLOWED_TOKEN_IDS=np.array([4], np.int32)).sampling["allowed_token_ids"] == [4]


@pytest.mark.parametrize("bad", [np.array([], np.int32), np.array([1.0, 2.0], np.float32), np.array([True])])
def test_allowed_token_ids_refused(bad):
    with pytest.raises(InvalidArgument) as e:
        llm(ALLOWED_TOKEN_IDS=bad)
    assert e.value.field == "ALLOWED_TOKEN_IDS"


def test_logit_bias():
    r = llm(LOGIT_BIAS_IDS=np.array([7, 8], np.int32), LOGIT_BIAS_VALUES=np.array([-100.0, 2.5], np.float32))
    assert r.sampling["logit_bias"] == {7: -100.0, 8: 2.5}
    assert all(type(k) is int and type(v) is float for k, v in r.sampling["logit_bias"].items())
    # with a batch dimension, float64 values
    r = llm(LOGIT_BIAS_IDS=np.array([[3]], np.int64), LOGIT_BIAS_VALUES=np.array([[0.5]], np.float64))
    assert r.sampling["logit_bias"] == {3: 0.5}
    # both can come with the other sampling inputs
    r = llm(LOGIT_BIAS_IDS=np.array([3]), LOGIT_BIAS_VALUES=np.array([1.0]), ALLOWED_TOKEN_IDS=np.array([3, 4]),
            TEMPERATURE=np.array([0.7], np.float32))
    assert r.sampling["logit_bias"] == {3: 1.0} and r.sampling["allowed_token_ids"] == [3, 4]
    assert r.sampling["temperature"] == pytest.approx(0.7)


@pytest.mark.parametrize("ids, values, field", [
    (np.array([1]), None, "LOGIT_BIAS_IDS"),                                        # must go together
    (None, np.array([1.0]), "LOGIT_BIAS_IDS"),
    (np.array([1, 2]), np.array([1.0]), "LOGIT_BIAS_VALUES"),                       # same length
    (np.array([1]), np.array([1.0, 2.0]), "LOGIT_BIAS_VALUES"),
    (np.array([1, 2]), np.array([1.0, np.nan]), "LOGIT_BIAS_VALUES"),               # finite
    (np.array([1]), np.array([np.inf], np.float32), "LOGIT_BIAS_VALUES"),
    (np.array([1]), np.array([-np.inf]), "LOGIT_BIAS_VALUES"),
    (np.array([1]), np.array([3], np.int32), "LOGIT_BIAS_VALUES"),                  # floats
    (np.array([1.0]), np.array([3.0]), "LOGIT_BIAS_IDS"),                           # integer ids
])
def test_logit_bias_refused(ids, values, field):
    with pytest.raises(InvalidArgument) as e:
        llm(LOGIT_BIAS_IDS=ids, LOGIT_BIAS_VALUES=values)
    assert e.value.field == field


# ----------------------------------------------------------------------------- model repository
def test_build_model_repo_token2wav_options(tiny_ckpt, tmp_path):
    voices = tmp_path / "my voices"
    out = build_model_repo(tiny_ckpt, tmp_path / "repo", voices_dir=str(voices), t2w_idle_timeout_s=2.5,
                           t2w_max_streams=5)
    t2w_cfg = (out / "token2wav" / "config.pbtxt").read_text()
    assert "${" not in t2w_cfg
    assert re.search(r"max_sequence_idle_microseconds: 2500000\b", t2w_cfg)
    assert re.search(r"max_candidate_sequences: 5\b", t2w_cfg)
    params = model_parameters({"parameters": {k: {"string_value": v} for k, v in re.findall(
        r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', t2w_cfg)}})
    assert get_param(params, "voices_dir") == str(voices.resolve())
    assert get_param(params, "model_dir") == str(tiny_ckpt.resolve())
    venc = out / "voice_encoder" / "config.pbtxt"
    assert venc.is_file() and "${" not in venc.read_text()
    assert (out / "token2wav" / "1" / "model.py").is_file() and (out / "voice_encoder" / "1" / "model.py").is_file()


def test_build_model_repo_defaults_for_token2wav(tiny_ckpt, tmp_path):
    out = build_model_repo(tiny_ckpt, tmp_path / "repo", models=["token2wav"])
    cfg = (out / "token2wav" / "config.pbtxt").read_text()
    assert "max_sequence_idle_microseconds: 60000000" in cfg and "max_candidate_sequences: 64" in cfg
    assert 'key: "voices_dir" value: { string_value: "" }' in cfg        # unset: the model's settings
    assert [p.name for p in out.iterdir()] == ["token2wav"]


@pytest.mark.parametrize("opts, field", [
    (dict(t2w_idle_timeout_s=0), "t2w_idle_timeout_s"),
    (dict(t2w_idle_timeout_s=-1.0), "t2w_idle_timeout_s"),
    (dict(t2w_max_streams=0), "t2w_max_streams"),
    (dict(t2w_max_batch=0), "t2w_max_batch"),
    (dict(voice_cache_items=-1), "voice_cache_items"),
])
def test_build_model_repo_refuses_bad_token2wav_options(tiny_ckpt, tmp_path, opts, field):
    with pytest.raises(InvalidArgument) as e:
        build_model_repo(tiny_ckpt, tmp_path / "repo", **opts)
    assert e.value.field == field
    assert not (tmp_path / "repo").exists()
