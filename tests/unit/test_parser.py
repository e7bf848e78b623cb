"""Output parser (spec §2.1, §2.2, §4.2, §9.4) on crafted TA4 streams built from tokenizer ids."""
from __future__ import annotations

import math
import random

import pytest

from stepaudio2.model.parser import (
    AudioCodes,
    OutputParser,
    TextDelta,
    ToolCall,
    ToolCallError,
    TtsEnd,
    TtsStart,
    merge_events,
    parse_output,
)
from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer
from stepaudio2.model.tokenizer import StepAudioTokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> StepAudioTokenizer:
    out = tmp_path_factory.mktemp("tiny-tokenizer-parser")
    write_tiny_tokenizer(out)
    return StepAudioTokenizer.from_dir(out)


def plain(tok, text: str) -> list[int]:
    """Ids of `text` as plain text, one character at a time (no added token can match)."""
    return [i for ch in text for i in tok.encode(ch)]


def ta4(tok, text_ids: list[int], codes: list[int]) -> list[int]:
    """Interleave 1 text id : 4 audio ids, padding both streams (spec §2.2)."""
    sp = tok.special
    groups = max(math.ceil(len(codes) / 4), len(text_ids))
    text = text_ids + [sp.tts_pad] * (groups - len(text_ids))
    audio = [sp.audio_code_id(c) for c in codes]
    audio += [sp.audio_code_id(sp.audio_pad_code)] * (4 * groups - len(audio))
    out = []
    for g in range(groups):
        out.append(text[g])
        out.extend(audio[4 * g: 4 * g + 4])
    return out


def texts(events, spoken=None) -> str:
    return "".join(e.text for e in events
                   if isinstance(e, TextDelta) and (spoken is None or e.spoken == spoken))


def codes_of(events) -> list[int]:
    return [c for e in events if isinstance(e, AudioCodes) for c in e.codes]


def run(tok, ids, in_tts=False):
    parser = OutputParser(tok, in_tts=in_tts)
    events = []
    for token_id in ids:
        events.extend(parser.feed(token_id))
    return events + parser.finish()


def test_ta4_stream_text_and_codes(tok):
    sp = tok.special
    text = "Hello, 世界! ok"
    text_ids = tok.encode(text)
    codes = [0, 6560] + [(37 * k) % 6561 for k in range(4 * len(text_ids) + 5)]
    # The text runs out first (<tts_pad> fills its slots) and the last group is short
    # (<audio_6561> fills it).
    stream = [sp.tts_start] + ta4(tok, text_ids, codes) + [sp.tts_end] + tok.encode("after") + [sp.eot]
    assert sp.tts_pad in stream and sp.audio_code_id(6561) in stream
    events = run(tok, stream)
    assert texts(events, spoken=True) == text
    assert texts(events, spoken=False) == "after"
    assert codes_of(events) == codes                    # pads dropped, order kept
    kinds = [type(e) for e in merge_events(events)]
    assert kinds[0] is TtsStart and TtsEnd in kinds
    assert kinds.index(TtsEnd) > max(i for i, k in enumerate(kinds) if k is AudioCodes)


def test_ta4_audio_runs_out_first(tok):
    sp = tok.special
    text = "a longer transcript than the audio"
    stream = ta4(tok, tok.encode(text), [1, 2, 3]) + [sp.tts_end]
    events = run(tok, stream, in_tts=True)             # <tts_start> was prefilled in the prompt
    assert texts(events, spoken=True) == text
    assert codes_of(events) == [1, 2, 3]
    assert [type(e) for e in events].count(TtsStart) == 0


def test_pads_and_control_ids_produce_nothing(tok):
    sp = tok.special
    parser = OutputParser(tok)
    for token_id in [sp.tts_pad, sp.audio_code_id(sp.audio_pad_code), sp.eot, sp.endoftext, sp.bot,
                     sp.audio_start, sp.audio_end, sp.audio_patch, tok.token_to_id("<|im_start|>"),
                     tok.token_to_id("<audio_patch_pad>"), tok.token_to_id("<|SC|>"), len(tok) + 5]:
        assert parser.feed(token_id) == []
    assert parser.finish() == []


def test_multibyte_character_split_across_tokens(tok):
    sp = tok.special
    for char in ("😀", "龘"):
        ids = tok.encode(char)
        assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")   # split inside the character
        parser = OutputParser(tok, in_tts=True)
        events = []
        for k, token_id in enumerate(ids):
            got = parser.feed(token_id)
            if k < len(ids) - 1:
                assert got == []                          # held back, nothing half-decoded
            events += got
            events += parser.feed(sp.audio_code_id(11))    # audio interleaved (TA4)
        assert texts(events) == char
        assert codes_of(events) == [11] * len(ids)


def test_deltas_concatenate_to_the_full_decode(tok):
    sp = tok.special
    rng = random.Random(0)
    samples = ["emoji 😀🎉 mixed 中文 text", "naïve café 𠀀 龘龘", "a < b, <tool and </tool_call> stay text",
               "<<<tool_cal", "trailing <tool_c"]
    for text in samples:
        text_ids = plain(tok, text) if rng.random() < 0.5 else tok.encode(text)
        stream = []
        for token_id in text_ids:
            stream.append(token_id)
            stream.extend(rng.choice([[], [sp.audio_code_id(3)], [sp.tts_pad], [sp.audio_code_id(6561)]]))
        events = run(tok, stream)
        assert texts(events) == tok.decode(text_ids) == text
        assert not any(isinstance(e, (ToolCall, ToolCallError)) for e in events)


def test_tool_prefix_is_held_then_released(tok):
    parser = OutputParser(tok)
    out = []
    for token_id in plain(tok, "x <tool"):
        out += parser.feed(token_id)
    assert texts(out) == "x "                             # "<tool" may still become a call
    out += parser.feed(tok.encode("!")[0])
    assert texts(out) == "x <tool!"


def _tool_call_stream(tok, special: bool, body: str) -> list[int]:
    if special:
        return [tok.special.tool_call_start] + tok.encode(body) + [tok.special.tool_call_end]
    return plain(tok, f"<tool_call>{body}</tool_call>")


@pytest.mark.parametrize("special", [True, False], ids=["special-token", "plain-text"])
def test_tool_call_after_tts_end(tok, special):
    sp = tok.special
    spoken = "好的，我查一下。"
    body = 'function\nsearch\n{"query": "上证指数 开盘价"}'
    stream = (ta4(tok, tok.encode(spoken), [9, 8, 7, 6, 5]) + [sp.tts_end]
              + _tool_call_stream(tok, special, body) + [sp.eot])
    events = merge_events(run(tok, stream, in_tts=True))
    assert codes_of(events) == [9, 8, 7, 6, 5]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("search", {"query": "上证指数 开盘价"}, f"<tool_call>{body}</tool_call>")]
    assert texts(events) == spoken
    assert isinstance(events[-1], ToolCall) and isinstance(events[-2], TtsEnd)


def test_two_tool_calls_and_text_between(tok):
    weather = 'function\nget_weather\n{"location": "shanghai"}'
    stream = (tok.encode("first ") + _tool_call_stream(tok, True, weather)
              + tok.encode(" then ")
              + _tool_call_stream(tok, False, 'function\nget_time\n{}')
              + _tool_call_stream(tok, True, "function\nopen_door\n{\"room\": \"kitchen\", \"n\": 2}")
              + tok.encode(" done"))
    events = run(tok, stream)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"location": "shanghai"}),
        ("get_time", {}),
        ("open_door", {"room": "kitchen", "n": 2}),
    ]
    assert texts(events) == "first  then  done"


@pytest.mark.parametrize("body, reason", [
    ('function\nsearch\n{"query": "unterminated', "not valid JSON"),
    ("function\nsearch\n[1, 2]", "JSON object"),
    ('function\n\n{"q": 1}', "name is empty"),
    ('call\nsearch\n{"q": 1}', "unknown call type"),
    ("just words", "expected"),
])
def test_malformed_tool_call_then_parser_keeps_working(tok, body, reason):
    good = 'function\nsearch\n{"q": "ok"}'
    stream = (_tool_call_stream(tok, True, body) + tok.encode("next")
              + _tool_call_stream(tok, False, good) + [tok.special.eot])
    events = run(tok, stream)
    errors = [e for e in events if isinstance(e, ToolCallError)]
    assert len(errors) == 1 and reason in errors[0].reason
    assert errors[0].raw == f"<tool_call>{body}</tool_call>"
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("search", {"q": "ok"}, f"<tool_call>{good}</tool_call>")]
    assert texts(events) == "next"


def test_unclosed_tool_call_at_finish(tok):
    parser = OutputParser(tok)
    events = parser.feed_many(
        tok.encode("ok ") + [tok.special.tool_call_start] + tok.encode('function\nsearch\n{"q"'))
    assert texts(events) == "ok " and not any(isinstance(e, ToolCallError) for e in events)
    end = parser.finish()
    assert len(end) == 1 and isinstance(end[0], ToolCallError)
    assert "unclosed" in end[0].reason and end[0].raw == '<tool_call>function\nsearch\n{"q"'
    # Ready for a new output.
    assert texts(parser.feed_many(tok.encode("fresh")) + parser.finish()) == "fresh"


def test_held_text_flushed_at_tts_boundaries(tok):
    sp = tok.special
    events = merge_events(run(tok, [sp.tts_start] + plain(tok, "look <") + [sp.tts_end] + tok.encode("x")))
    assert events == [TtsStart(), TextDelta("look <", True), TtsEnd(), TextDelta("x", False)]


def test_tool_call_spanning_tts_end_still_parses(tok):
    sp = tok.special
    stream = ([sp.tool_call_start] + tok.encode("function\nf\n") + [sp.tts_end]
              + tok.encode("{}") + [sp.tool_call_end])
    events = run(tok, stream, in_tts=True)
    assert events == [TtsEnd(), ToolCall("f", {}, "<tool_call>function\nf\n{}</tool_call>")]


def test_parse_output_merges(tok):
    sp = tok.special
    events = parse_output(tok, ta4(tok, tok.encode("hi there"), list(range(12))) + [sp.tts_end], in_tts=True)
    assert [type(e) for e in events][-1] is TtsEnd
    assert texts(events) == "hi there" and codes_of(events) == list(range(12))
    assert len(events) < len(tok.encode("hi there")) + 12   # neighbours merged
