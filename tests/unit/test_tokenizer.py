"""Tokenizer loading and the tiny tokenizer (spec §2.1, §5.1; PUBLIC_API.md "Checkpoint folders")."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepaudio2.model.tiny_tokenizer import (
    NUM_AUDIO_TOKENS,
    added_token_names,
    real_special_token_layout,
    write_tiny_tokenizer,
)
from stepaudio2.model.tokenizer import StepAudioTokenizer, audio_token
from stepaudio2.runtime.errors import CheckpointError

TINY_FILES = {"vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
              "special_tokens_map.json"}

# Mixed strings for round trips and the transformers cross-check.
SAMPLES = [
    "Hello world!",
    "You are a helpful assistant.",
    "open the door",
    "zero one two three four five six seven eight nine",
    "0123456789 and 3.14159, 16000 Hz, 2025-08-29",
    "请记录下你所听到的语音内容。",
    "请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。",
    "你好呀，我是你的AI助手，很高兴认识你！",
    "emoji 😀🎉 and accents: café naïve Ünïcödé",
    "龘 is a rare character; so is 𠀀.",
    "line one\nline two\r\nline three\n\n\n  indented\ttab",
    "   leading and trailing spaces   ",
    "It's, they're, we'll, I'D, you've, she'S",
    '{"query": "上证指数 开盘价", "n": 3}',
    '<tool_call>function\nsearch\n{"query": "weather"}</tool_call>',
    "<|BOT|>system\n请记录下你所听到的语音内容。<|EOT|><|BOT|>human\n",
    "<audio_start><audio_patch><audio_patch><audio_patch><audio_end><|EOT|>",
    "<|BOT|>assistant\n<tts_start>hi<tts_pad><audio_0><audio_6561><audio_6560><tts_end><|EOT|>",
    "text<|endoftext|>more<|im_start|>x<|im_end|>",
    "a<|BOT|>b<|EOT|>c <tts_start> d",
    "",
]


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tok(tiny_tok_dir) -> StepAudioTokenizer:
    return StepAudioTokenizer.from_dir(tiny_tok_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- tiny tokenizer: files and layout ------------------------------------------------------------

def test_tiny_file_set_matches_the_real_checkpoint(tiny_tok_dir):
    assert {p.name for p in tiny_tok_dir.iterdir()} == TINY_FILES  # no tokenizer.json
    assert (tiny_tok_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    config = json.loads((tiny_tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["bos_token"] is None
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 16384
    assert config["clean_up_tokenization_spaces"] is False
    assert config["split_special_tokens"] is False
    assert config["errors"] == "replace"
    decoder = config["added_tokens_decoder"]
    by_content = {v["content"]: v for v in decoder.values()}
    assert by_content["<tool_call>"]["special"] is False    # as in Qwen2.5
    assert by_content["</tool_call>"]["special"] is False
    assert by_content["<|endoftext|>"]["special"] is True
    assert by_content["<|EOT|>"]["special"] is True
    assert by_content["<audio_6561>"]["special"] is True
    special_map = json.loads((tiny_tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["eos_token"]["content"] == "<|endoftext|>"
    assert "<|BOT|>" in special_map["additional_special_tokens"]


def test_write_returns_total_vocab_size(tmp_path, tok):
    n = write_tiny_tokenizer(tmp_path / "t")
    assert n == len(tok) == tok.vocab_size == 1024 + len(added_token_names())
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(1024))


def test_real_layout_offsets(tok):
    layout = real_special_token_layout()
    assert layout[0] == ("<|endoftext|>", 151643)
    assert layout[-1] == ("<audio_6561>", 158257)
    real = dict(layout)
    # Ids confirmed in the spec (§2.1) and PUBLIC_API.md.
    assert real["<tool_call>"] == 151657 and real["</tool_call>"] == 151658
    assert real["<|EOT|>"] == 151665 and real["<|BOT|>"] == 151666
    assert (real["<audio_start>"], real["<audio_end>"], real["<audio_patch>"]) == (151688, 151689, 151690)
    assert (real["<tts_start>"], real["<tts_end>"], real["<tts_pad>"]) == (151693, 151694, 151695)
    assert real["<audio_0>"] == 151696 and real["<patch_newline>"] == 151687
    # The tiny tokenizer keeps every relative offset.
    base = tok.token_to_id("<|endoftext|>")
    for name, real_id in layout:
        assert tok.token_to_id(name) == base + (real_id - 151643), name
    assert tok.token_to_id("<audio_patch>") - tok.token_to_id("<|EOT|>") == 151690 - 151665


def test_special_tokens_read_from_the_files(tok):
    sp = tok.special
    assert sp.num_audio_codes == NUM_AUDIO_TOKENS == 6562
    assert sp.audio_pad_code == 6561
    assert sp.audio_code_base == tok.token_to_id("<audio_0>")
    for code in range(sp.num_audio_codes):
        assert tok.token_to_id(audio_token(code)) == sp.audio_code_base + code
    assert tok.token_to_id("<audio_6562>") is None
    assert sp.tool_call_start == tok.token_to_id("<tool_call>") is not None
    assert sp.tool_call_end == tok.token_to_id("</tool_call>") is not None
    assert sp.endoftext < sp.eot < sp.bot < sp.audio_start < sp.tts_pad < sp.audio_code_base
    assert tok.id_to_token(sp.tts_start) == "<tts_start>"
    assert sp.is_audio_code(sp.audio_code_base + 6561) and not sp.is_audio_code(sp.tts_pad)


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_tok_dir):
    # A second write in this process and one in a fresh process (other hash seed).
    write_tiny_tokenizer(tmp_path / "again")
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer; "
         "write_tiny_tokenizer(sys.argv[1])", str(tmp_path / "fresh")],
        check=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    for name in TINY_FILES:
        ref = (tiny_tok_dir / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == ref, name
        assert (tmp_path / "fresh" / name).read_bytes() == ref, name


# -- encode / decode -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_inside_text_are_single_ids(tok):
    sp = tok.special
    for name, token_id in [("<|BOT|>", sp.bot), ("<|EOT|>", sp.eot), ("<audio_patch>", sp.audio_patch),
                           ("<tts_start>", sp.tts_start), ("<audio_6561>", sp.audio_code_base + 6561),
                           ("<tool_call>", sp.tool_call_start), ("<|endoftext|>", sp.endoftext)]:
        assert tok.encode(name) == [token_id]
        ids = tok.encode(f"ab{name}cd")
        assert ids.count(token_id) == 1
        assert tok.decode(ids) == f"ab{name}cd"
    assert tok.encode("<|BOT|>human\n")[0] == sp.bot


def test_nothing_added_at_start_or_end(tok):
    assert tok.encode("") == []
    assert tok.encode("a") == [tok.token_to_id("a")]


def test_decode_skip_special_tokens_keeps_tool_call_tags(tok):
    ids = tok.encode("<|BOT|>assistant\nhi<tool_call>function\nf\n{}</tool_call><|EOT|>")
    # <tool_call>/</tool_call> are flagged special: false, as in Qwen2.5.
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nhi<tool_call>function\nf\n{}</tool_call>"


# -- cross-check against transformers (test-only dependency) ----------------------------------

@pytest.fixture(scope="module")
def hf_tok(tiny_tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_tok_dir))


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_same_vocabulary_as_transformers(tok, hf_tok):
    assert hf_tok.get_vocab() == tok.backend.get_vocab(with_added_tokens=True)
    assert len(hf_tok) == len(tok)


# -- loader -------------------------------------------------------------------------------------------

def test_tokenizer_json_is_used_when_present(tmp_path, tiny_tok_dir, tok):
    d = _copy(tiny_tok_dir, tmp_path / "with-json")
    tok.save_tokenizer_json(d / "tokenizer.json")
    (d / "vocab.json").unlink()   # proves the loader read tokenizer.json
    (d / "merges.txt").unlink()
    loaded = StepAudioTokenizer.from_dir(d)
    assert loaded.source.endswith("tokenizer.json")
    assert loaded.special == tok.special
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)


def test_tokenizer_json_checked_against_added_tokens_json(tmp_path, tiny_tok_dir, tok):
    d = _copy(tiny_tok_dir, tmp_path / "json-mismatch")
    tok.save_tokenizer_json(d / "tokenizer.json")
    added = json.loads((d / "added_tokens.json").read_text(encoding="utf-8"))
    added["<tts_end>"] += 1000
    (d / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(CheckpointError, match="<tts_end>"):
        StepAudioTokenizer.from_dir(d)


def test_tampered_added_tokens_json_id(tmp_path, tiny_tok_dir, tok):
    d = _copy(tiny_tok_dir, tmp_path / "tampered")
    added = json.loads((d / "added_tokens.json").read_text(encoding="utf-8"))
    real = added["<|BOT|>"]
    added["<|BOT|>"] = real + 7
    (d / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        StepAudioTokenizer.from_dir(d)
    message = str(info.value)
    assert "<|BOT|>" in message and str(real + 7) in message and str(real) in message
    assert "added_tokens.json" in message


def test_tampered_config_id(tmp_path, tiny_tok_dir):
    d = _copy(tiny_tok_dir, tmp_path / "tampered-config")
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = config["added_tokens_decoder"]
    # Move <audio_end> to a free id past the end: a gap the files cannot express.
    key = next(k for k, v in decoder.items() if v["content"] == "<audio_end>")
    decoder[str(10**6)] = decoder.pop(key)
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (d / "added_tokens.json").unlink()
    with pytest.raises(CheckpointError, match="added token"):
        StepAudioTokenizer.from_dir(d)


def test_added_tokens_json_alone_is_enough(tmp_path, tiny_tok_dir, tok):
    d = _copy(tiny_tok_dir, tmp_path / "no-config")
    (d / "tokenizer_config.json").unlink()
    loaded = StepAudioTokenizer.from_dir(d)
    assert loaded.special == tok.special
    assert loaded.encode(SAMPLES[15]) == tok.encode(SAMPLES[15])


@pytest.mark.parametrize("missing", ["merges.txt", "vocab.json"])
def test_missing_file_is_named(tmp_path, tiny_tok_dir, missing):
    d = _copy(tiny_tok_dir, tmp_path / "missing")
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        StepAudioTokenizer.from_dir(d)


def test_missing_added_tokens_is_named(tmp_path, tiny_tok_dir):
    d = _copy(tiny_tok_dir, tmp_path / "no-added")
    (d / "tokenizer_config.json").unlink()
    (d / "added_tokens.json").unlink()
    with pytest.raises(CheckpointError, match=r"added_tokens\.json"):
        StepAudioTokenizer.from_dir(d)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        StepAudioTokenizer.from_dir(tmp_path / "nope")


def _rename_added_token(d: Path, old: str, new: str) -> None:
    added = json.loads((d / "added_tokens.json").read_text(encoding="utf-8"))
    added[new] = added.pop(old)
    (d / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    for entry in config["added_tokens_decoder"].values():
        if entry["content"] == old:
            entry["content"] = new
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_required_special_token_missing(tmp_path, tiny_tok_dir):
    d = _copy(tiny_tok_dir, tmp_path / "no-tts-pad")
    _rename_added_token(d, "<tts_pad>", "<|something_else|>")
    with pytest.raises(CheckpointError, match="<tts_pad>"):
        StepAudioTokenizer.from_dir(d)


def test_audio_tokens_must_be_consecutive(tmp_path, tiny_tok_dir):
    d = _copy(tiny_tok_dir, tmp_path / "swapped")
    _rename_added_token(d, "<audio_5>", "<audio_tmp>")
    _rename_added_token(d, "<audio_6>", "<audio_5>")
    _rename_added_token(d, "<audio_tmp>", "<audio_6>")
    with pytest.raises(CheckpointError, match="consecutive"):
        StepAudioTokenizer.from_dir(d)


def test_no_tool_call_tokens_gives_none(tmp_path, tiny_tok_dir):
    d = _copy(tiny_tok_dir, tmp_path / "no-tool-tokens")
    _rename_added_token(d, "<tool_call>", "<|tool_a|>")
    _rename_added_token(d, "</tool_call>", "<|tool_b|>")
    loaded = StepAudioTokenizer.from_dir(d)
    assert loaded.special.tool_call_start is None and loaded.special.tool_call_end is None
    assert len(loaded.encode("<tool_call>")) > 1


# -- house rule: torch-free --------------------------------------------------------------------------

def test_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import stepaudio2.model.tokenizer, stepaudio2.model.prompt, stepaudio2.model.parser, "
        "stepaudio2.model.tiny_tokenizer\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
