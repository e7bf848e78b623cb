"""The shipped digit-ASR demo checkpoint (issue 5): it loads like any checkpoint, really
transcribes the held-out set, and the pipeline that made it runs end to end."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stepaudio2.model.eval_asr import edit_distance, evaluate, normalize, read_manifest, transcribe, wer, word_errors
from stepaudio2.model.train_demo import (TRAIN_VOICES, UNSEEN_VOICE, causal_forward, is_held_out, plan_utterances,
                                         train_demo)

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "assets" / "demo-checkpoint"
EVAL = ROOT / "assets" / "eval-digits"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


# -- WER -------------------------------------------------------------------------------------------

def test_normalize():
    assert normalize("Three, ONE four!") == ["three", "one", "four"]
    assert normalize("  3 1-4 ") == ["three", "one", "four"]
    assert normalize("314.") == ["three", "one", "four"]
    assert normalize("") == []


def test_edit_distance():
    assert edit_distance([], []) == 0
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a b c".split(), "a x c".split()) == 1        # substitution
    assert edit_distance("a b c".split(), "a c".split()) == 1          # deletion
    assert edit_distance("a b c".split(), "a b b c".split()) == 1      # insertion
    assert edit_distance("a b c".split(), []) == 3
    assert edit_distance([], "a b".split()) == 2
    assert edit_distance("one two three four".split(), "two three four five".split()) == 2


def test_wer_is_corpus_level():
    assert word_errors("one two three", "one too three") == (1, 3)
    assert wer(["one two three", "four"], ["one two three", "five six"]) == pytest.approx(2 / 4)
    assert wer(["One, two."], ["one two"]) == 0.0
    assert wer([], []) == 0.0
    with pytest.raises(ValueError):
        wer(["a"], [])


# -- the shipped checkpoint and eval set --------------------------------------------------------------

def test_shipped_checkpoint_loads_strictly():
    from stepaudio2.model import StepAudio2
    from stepaudio2.model.checkpoint import checkpoint_bytes, load_state_dict
    from stepaudio2.model.config import StepAudio2Config
    from stepaudio2.model.modeling import expected_shapes

    cfg = StepAudio2Config.from_file(CKPT)
    expected = expected_shapes(cfg)
    state = load_state_dict(CKPT, expected)          # strict: names and shapes, nothing extra
    assert set(state) == set(expected) and all(t.dtype == torch.float32 for t in state.values())
    assert not any("ctc" in k for k in state)        # the training-only CTC head is not shipped
    model = StepAudio2.from_pretrained(CKPT)
    assert model.dtype == torch.float32 and cfg.torch_dtype == "float32"
    total = sum(f.stat().st_size for f in CKPT.iterdir() if f.is_file())
    assert checkpoint_bytes(CKPT) < total < 15 * 1024 * 1024
    idx = json.loads((CKPT / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1  # sharded, as the real checkpoint


def test_eval_set_is_held_out_and_well_formed():
    rows = read_manifest(EVAL)
    assert len(rows) >= 50
    unseen = [r for r in rows if r["voice"] == UNSEEN_VOICE]
    assert len(unseen) >= 15 and UNSEEN_VOICE not in TRAIN_VOICES
    for r in rows:
        assert is_held_out(r["text"])                # training never draws these strings
        info = sf.info(str(EVAL / r["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert not any(is_held_out(u.text) for u in plan_utterances(300, 0, TRAIN_VOICES))


@pytest.fixture(scope="module")
def shipped_model():
    from stepaudio2.model import StepAudio2

    return StepAudio2.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def shipped_result(shipped_model):
    return evaluate(None, EVAL, model=shipped_model, threads=1)  # 1 thread: fast alone, robust when busy


def test_shipped_checkpoint_transcribes_held_out_digits(shipped_result):
    res = shipped_result
    assert res["n"] >= 50
    assert res["wer"] <= 0.02, [r for r in res["rows"] if r["errors"]]


def test_shipped_checkpoint_transcribes_an_unseen_voice(shipped_result):
    s = shipped_result["per_voice"][UNSEEN_VOICE]
    assert s["n"] >= 15
    assert s["wer"] <= 0.02, [r for r in shipped_result["rows"] if r["errors"] and r["voice"] == UNSEEN_VOICE]


def test_shipped_checkpoint_transcribes_the_bundled_demo_wav(shipped_model):
    ref = (ROOT / "assets" / "demo_digits.txt").read_text()
    assert normalize(transcribe(shipped_model, str(ROOT / "assets" / "demo_digits.wav"))) == normalize(ref)


# -- the training pieces ------------------------------------------------------------------------------

def test_causal_forward_matches_the_serving_forward(tiny_model):
    """Training's full-sequence forward = the KV-cache forward the model serves with."""
    from stepaudio2.model.prompt import asr_messages, build_prompt

    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    prompt = build_prompt(tiny_model.tokenizer, asr_messages(wave))
    audio = tiny_model.encode_chunks(prompt.audio_chunks)
    ref = tiny_model.logits(prompt.input_ids, audio)
    with torch.no_grad():
        x = tiny_model.embed(prompt.input_ids, audio)
        got = tiny_model.net.lm_head(causal_forward(tiny_model.net.model, x[None]))[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@needs_espeak
def test_train_demo_end_to_end(tmp_path):
    """A few steps on a handful of utterances (pipeline only: the result is not trained)."""
    from stepaudio2.model import StepAudio2
    from stepaudio2.model.tiny import TinyDims

    kw = dict(minutes=2.0, seed=3, steps=3, work_dir=tmp_path / "work", n_utterances=6, dims=TinyDims(),
              batch_size=4, n_dev=2, n_dev_unseen=1, progress=False)
    s = train_demo(tmp_path / "a", **kw)
    assert s["steps"] == 3 and s["dev"]["n"] == 3 and 0.0 <= s["dev"]["wer"]
    model = StepAudio2.from_pretrained(tmp_path / "a")
    assert isinstance(transcribe(model, wave_of(tmp_path / "work"), max_new_tokens=4), str)
    assert json.loads((tmp_path / "a" / "train_demo.json").read_text())["recipe"]["seed"] == 3
    # Same seed, same steps, cached data: the same weights, byte for byte.
    train_demo(tmp_path / "b", **{**kw, "n_dev": 0, "n_dev_unseen": 0})
    for f in sorted((tmp_path / "a").glob("model-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def wave_of(work: Path) -> str:
    return str(next(work.glob("dev-*/000.wav")))
