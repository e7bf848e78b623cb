"""Prompt builder (spec §2.3, §4.2; reference `StepAudio2.apply_chat_template`)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from stepaudio2.model.prompt import (
    ASR_PROMPT,
    CAPTION_PROMPT,
    S2ST_PROMPTS,
    S2TT_PROMPTS,
    TOOL_RESULT_INSTRUCTION,
    Prompt,
    asr_messages,
    build_base_prompt,
    build_prompt,
    caption_messages,
    chat_messages,
    s2st_messages,
    s2tt_messages,
    tool_messages,
    tool_result_message,
    tts_base_prompt,
)
from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer
from stepaudio2.model.tokenizer import StepAudioTokenizer
from stepaudio2.runtime.errors import InvalidArgument

SR = 16000


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> StepAudioTokenizer:
    out = tmp_path_factory.mktemp("tiny-tokenizer-prompt")
    write_tiny_tokenizer(out)
    return StepAudioTokenizer.from_dir(out)


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SR)), dtype=np.float32) / SR
    return (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def _audio_run(n: int) -> str:
    return "<audio_start>" + "<audio_patch>" * n + "<audio_end>"


def _runs(prompt: Prompt, tok: StepAudioTokenizer) -> list[int]:
    """Lengths of the runs of <audio_patch> ids."""
    runs, n = [], 0
    for token_id in prompt.input_ids + [-1]:
        if token_id == tok.special.audio_patch:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_asr_prompt_exact(tok):
    audio = _tone(1.0)
    prompt = build_prompt(tok, asr_messages(audio))
    expected = (f"<|BOT|>system\n{ASR_PROMPT}<|EOT|><|BOT|>human\n{_audio_run(13)}<|EOT|>"
                "<|BOT|>assistant\n")
    assert tok.decode(prompt.input_ids) == expected
    assert ASR_PROMPT == "请记录下你所听到的语音内容。"
    assert prompt.patch_counts == [13]                 # 1 s -> 13 patches (spec §1.5)
    assert len(prompt.audio_chunks) == 1
    assert prompt.audio_chunks[0].dtype == np.float32
    np.testing.assert_array_equal(prompt.audio_chunks[0], audio)


def test_pieces_are_tokenised_separately(tok):
    sp = tok.special
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "open"}, {"type": "text", "text": " the door"},
                                     {"type": "audio", "audio": _tone(0.5)}]},
        {"role": "assistant", "content": None},
    ]
    prompt = build_prompt(tok, messages)
    expected = (tok.encode("<|BOT|>system\nYou are a helpful assistant.<|EOT|>")
                + tok.encode("<|BOT|>human\n") + tok.encode("open") + tok.encode(" the door")
                + tok.encode(_audio_run(6)) + tok.encode("<|EOT|>") + tok.encode("<|BOT|>assistant\n"))
    assert prompt.input_ids == expected
    assert tok.encode(_audio_run(6)) == [sp.audio_start] + [sp.audio_patch] * 6 + [sp.audio_end]
    assert prompt.patch_counts == [6]                  # 0.5 s -> 6 (spec §1.5)


def test_long_audio_is_chunked_at_25_seconds(tok):
    audio = _tone(70.0)
    prompt = build_prompt(tok, asr_messages(audio))
    assert prompt.patch_counts == [313, 313, 250]
    assert [len(c) for c in prompt.audio_chunks] == [400_000, 400_000, 320_000]
    assert _runs(prompt, tok) == prompt.patch_counts
    np.testing.assert_array_equal(np.concatenate(prompt.audio_chunks), audio)
    text = tok.decode(prompt.input_ids)
    assert f"<|BOT|>human\n{_audio_run(313)}{_audio_run(313)}{_audio_run(250)}<|EOT|>" in text


def test_audio_from_wav_bytes_and_path(tok, tmp_path):
    buf = io.BytesIO()
    sf.write(buf, _tone(2.0), SR, format="WAV", subtype="PCM_16")
    path = tmp_path / "two_seconds.wav"
    path.write_bytes(buf.getvalue())
    for src in (buf.getvalue(), str(path), path):
        prompt = build_prompt(tok, caption_messages(src))
        assert prompt.patch_counts == [25]             # 2 s -> 25 (spec §1.5)
        assert tok.decode(prompt.input_ids).startswith(f"<|BOT|>system\n{CAPTION_PROMPT}<|EOT|>")


@pytest.mark.parametrize("target", ["zh", "en"])
def test_s2tt(tok, target):
    prompt = build_prompt(tok, s2tt_messages(_tone(1.0), target=target))
    assert tok.decode(prompt.input_ids) == (
        f"<|BOT|>system\n{S2TT_PROMPTS[target]}<|EOT|><|BOT|>human\n{_audio_run(13)}<|EOT|>"
        "<|BOT|>assistant\n")
    assert S2TT_PROMPTS["zh"] == "请仔细聆听这段语音，然后将其内容翻译成中文。"


def test_s2st_prefills_tts_start_without_eot(tok):
    prompt = build_prompt(tok, s2st_messages(_tone(1.0), target="zh"))
    text = tok.decode(prompt.input_ids)
    assert text == (f"<|BOT|>system\n{S2ST_PROMPTS['zh']}<|EOT|><|BOT|>human\n{_audio_run(13)}<|EOT|>"
                    "<|BOT|>assistant\n<tts_start>")
    assert prompt.input_ids[-1] == tok.special.tts_start


def test_chat_text_and_speech_out(tok):
    text_out = build_prompt(tok, chat_messages("Give me a brief introduction to the Great Wall."))
    assert tok.decode(text_out.input_ids) == (
        "<|BOT|>system\nYou are a helpful assistant.<|EOT|>"
        "<|BOT|>human\nGive me a brief introduction to the Great Wall.<|EOT|><|BOT|>assistant\n")
    speech = build_prompt(tok, chat_messages([{"type": "audio", "audio": _tone(1.0)}], speech_out=True))
    assert tok.decode(speech.input_ids) == (
        "<|BOT|>system\nYou are a helpful assistant.<|EOT|>"
        f"<|BOT|>human\n{_audio_run(13)}<|EOT|><|BOT|>assistant\n<tts_start>")
    assert speech.input_ids[-1] == tok.special.tts_start
    assert text_out.audio_chunks == [] and text_out.patch_counts == []


def test_chat_history_with_raw_tokens(tok):
    sp = tok.special
    generated = tok.encode("hi") + [sp.audio_code_base + 7, sp.audio_code_base + 6561, sp.tts_end]
    history = [
        {"role": "system", "content": "请用语音与我交流。"},
        {"role": "human", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "<tts_start>"},
                                          {"type": "token", "token": generated}]},
        {"role": "human", "content": "again"},
    ]
    prompt = build_prompt(tok, chat_messages(history, speech_out=False))
    expected = (tok.encode("<|BOT|>system\n请用语音与我交流。<|EOT|>") + tok.encode("<|BOT|>human\nhello<|EOT|>")
                + tok.encode("<|BOT|>assistant\n") + tok.encode("<tts_start>") + generated
                + tok.encode("<|EOT|>") + tok.encode("<|BOT|>human\nagain<|EOT|>")
                + tok.encode("<|BOT|>assistant\n"))
    assert prompt.input_ids == expected    # history kept its own system turn, tokens spliced raw


def test_tool_schemas_turn(tok):
    tools = [{"type": "function", "function": {
        "name": "search", "description": "搜索工具",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}}]
    messages = tool_messages("你是小跃。", tools, [{"type": "audio", "audio": _tone(1.0)}])
    assert messages[1] == {"role": "tool_json_schemas", "content": json.dumps(tools, ensure_ascii=False)}
    schema_line = ('[{"type": "function", "function": {"name": "search", "description": "搜索工具", '
                   '"parameters": {"type": "object", "properties": {"query": {"type": "string"}}, '
                   '"required": ["query"]}}}]')
    prompt = build_prompt(tok, messages)
    assert tok.decode(prompt.input_ids) == (
        f"<|BOT|>system\n你是小跃。<|EOT|><|BOT|>tool_json_schemas\n{schema_line}<|EOT|>"
        f"<|BOT|>human\n{_audio_run(13)}<|EOT|><|BOT|>assistant\n<tts_start>")


def test_tool_result_turn(tok):
    msg = tool_result_message("上证指数开盘 3000 点")
    assert msg["role"] == "input"
    assert TOOL_RESULT_INSTRUCTION == "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"
    prompt = build_prompt(tok, [msg])
    assert tok.decode(prompt.input_ids) == f"<|BOT|>input\n上证指数开盘 3000 点{TOOL_RESULT_INSTRUCTION}<|EOT|>"
    assert prompt.input_ids == (tok.encode("<|BOT|>input\n") + tok.encode("上证指数开盘 3000 点")
                                + tok.encode(TOOL_RESULT_INSTRUCTION) + [tok.special.eot])


def test_tts_base_prompt(tok):
    prompt = build_base_prompt(tok, tts_base_prompt("你好呀，我是你的AI助手，很高兴认识你！"))
    assert tok.decode(prompt.input_ids) == "以自然的语速读出下面的文字。\n你好呀，我是你的AI助手，很高兴认识你！<tts_start>"
    assert prompt.input_ids[-1] == tok.special.tts_start
    assert tok.special.bot not in prompt.input_ids


def test_base_prompt_with_audio_and_tokens(tok):
    prompt = build_base_prompt(tok, [ASR_PROMPT, {"type": "audio", "audio": _tone(1.0)}, [5, 6]])
    assert prompt.input_ids == tok.encode(ASR_PROMPT) + tok.encode(_audio_run(13)) + [5, 6]


def test_eot_false_on_list_content(tok):
    message = {"role": "assistant", "content": [{"type": "text", "text": "x"}], "eot": False}
    prompt = build_prompt(tok, [message])
    assert tok.decode(prompt.input_ids) == "<|BOT|>assistant\nx"


@pytest.mark.parametrize("messages, field", [
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "system", "content": "x"}, {"role": "human", "content": [{"type": "video"}]}],
     "messages[1].content[0].type"),
    ([{"role": "human", "content": 42}], "messages[0].content"),
    ([{"role": "human"}], "messages[0].content"),
    ([{"role": "human", "content": "x", "eot": "no"}], "messages[0].eot"),
    ([{"role": "human", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "human", "content": [{"type": "token", "token": [1, -2]}]}], "messages[0].content[0].token"),
    ([{"role": "human", "content": [{"type": "token", "token": "12"}]}], "messages[0].content[0].token"),
    ([{"role": "human", "content": [{"type": "audio"}]}], "messages[0].content[0].audio"),
    ([{"role": "human", "content": ["raw string item"]}], "messages[0].content[0]"),
    (["not a dict"], "messages[0]"),
    ({"role": "human", "content": "x"}, "messages"),
])
def test_bad_messages(tok, messages, field):
    with pytest.raises(InvalidArgument) as info:
        build_prompt(tok, messages)
    assert info.value.field == field


def test_bad_target_language():
    with pytest.raises(InvalidArgument) as info:
        s2tt_messages(_tone(1.0), target="fr")
    assert info.value.field == "target"


def test_bad_audio_is_invalid_argument(tok):
    with pytest.raises(InvalidArgument):
        build_prompt(tok, asr_messages(b"definitely not audio"))
