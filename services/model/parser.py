"""Incremental parser of Step-Audio 2 output ids (spec §2.1, §2.2, §4.2, §9.4), torch-free.

Feed generated ids one at a time; get events back:
- text ids (below `<audio_start>`, not flagged special) become `TextDelta`s, decoded
  incrementally: byte-level BPE tokens can split a UTF-8 character, so ids are held back
  until their decode no longer ends in an incomplete sequence (U+FFFD);
- `<tts_start>`/`<tts_end>` become `TtsStart`/`TtsEnd`; text between them is `spoken`;
- `<audio_N>` become `AudioCodes` (code N); the pad code (`<audio_6561>`) and `<tts_pad>`
  are dropped (spec §2.2);
- `<tool_call>function\\nNAME\\nJSON</tool_call>` becomes `ToolCall` (or `ToolCallError`),
  whether `<tool_call>` comes as one token or as plain text split across tokens;
- other control ids (`<|EOT|>`, `<|endoftext|>`, `<audio_start>`, ...) produce nothing.

The text stream is the text ids in order; audio and control ids interleaved with them (TA4,
spec §2.2) do not interrupt it. The concatenated `TextDelta.text` equals the decode of all
text ids minus the tool-call spans.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Union

from stepaudio2.model.tokenizer import TOOL_CALL_END, TOOL_CALL_START, StepAudioTokenizer

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class TextDelta:
    text: str
    spoken: bool  # inside <tts_start> ... <tts_end>


@dataclass(frozen=True)
class AudioCodes:
    codes: list[int] = field(default_factory=list)  # speech codes, id - audio_code_base


@dataclass(frozen=True)
class TtsStart:
    pass


@dataclass(frozen=True)
class TtsEnd:
    pass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    raw: str  # the whole span, "<tool_call>...</tool_call>"


@dataclass(frozen=True)
class ToolCallError:
    raw: str
    reason: str


Event = Union[TextDelta, AudioCodes, TtsStart, TtsEnd, ToolCall, ToolCallError]


def _partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def parse_tool_call(inner: str, raw: str) -> ToolCall | ToolCallError:
    """`function\\nNAME\\nJSON` (spec §4.2): split on the first two newlines into type, name
    and arguments. Surrounding whitespace is ignored, as StepFun's vLLM parser strips it;
    missing or empty arguments mean `{}`."""
    parts = inner.strip().split("\n", 2)
    if len(parts) < 2:
        return ToolCallError(raw, "expected 'function\\nNAME\\nJSON arguments' inside <tool_call>")
    kind, name = parts[0].strip(), parts[1].strip()
    if kind != "function":
        return ToolCallError(raw, f"unknown call type {kind!r} (expected 'function')")
    if not name:
        return ToolCallError(raw, "the function name is empty")
    args_text = parts[2].strip() if len(parts) == 3 else ""
    if not args_text:
        return ToolCall(name, {}, raw)
    try:
        arguments = json.loads(args_text)
    except json.JSONDecodeError as exc:
        return ToolCallError(raw, f"arguments are not valid JSON: {exc}")
    if not isinstance(arguments, dict):
        return ToolCallError(raw, f"arguments must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments, raw)


class OutputParser:
    """Turns generated ids into events, one id at a time.

    `in_tts=True` starts inside a spoken section, for prompts whose assistant prefix already
    holds `<tts_start>` (spec §2.3: the prefill is part of the prompt, not of the output).
    """

    def __init__(self, tokenizer: StepAudioTokenizer, in_tts: bool = False):
        self.tok = tokenizer
        self.sp = tokenizer.special
        tool_ids = {i for i in (self.sp.tool_call_start, self.sp.tool_call_end) if i is not None}
        # Control ids below <audio_start> (EOT, BOT, endoftext, ...) give no text (spec §9.4);
        # the tool-call tags are text to this parser, however the checkpoint flags them.
        self._silent = frozenset(tokenizer.special_token_ids - tool_ids)
        self.in_tts = in_tts
        self._pending_ids: list[int] = []  # text ids whose decode ends mid-character
        self._held = ""                    # text that may be the start of "<tool_call>"
        self._call: str | None = None      # inner text of an open tool call

    # -- public -------------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        sp = self.sp
        events: list[Event] = []
        if token_id < 0:
            pass                                    # not an id: nothing, like ids past the vocabulary
        elif token_id < sp.audio_start:
            if token_id not in self._silent:
                self._pending_ids.append(token_id)
                text = self.tok.decode(self._pending_ids)
                if not text.endswith(_REPLACEMENT):
                    self._pending_ids.clear()
                    self._text(text, events)
        elif sp.is_audio_code(token_id):
            code = sp.audio_code(token_id)
            if code != sp.audio_pad_code:
                events.append(AudioCodes([code]))
        elif token_id == sp.tts_start:
            self._flush_text(events)
            self.in_tts = True
            events.append(TtsStart())
        elif token_id == sp.tts_end:
            self._flush_text(events)
            self.in_tts = False
            events.append(TtsEnd())
        # <tts_pad>, <audio_start>/<audio_end>/<audio_patch>..., ids past the vocabulary: nothing.
        return events

    def feed_many(self, token_ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for token_id in token_ids:
            events.extend(self.feed(token_id))
        return events

    def finish(self) -> list[Event]:
        """End of output: flush held text; an unclosed tool call becomes a ToolCallError.
        The parser is then ready for a new output (in the same spoken state)."""
        events: list[Event] = []
        self._flush_text(events)
        if self._call is not None:
            raw = TOOL_CALL_START + self._call
            self._call = None
            events.append(ToolCallError(raw, "unclosed tool call: output ended before </tool_call>"))
        return events

    # -- text stream --------------------------------------------------------------------------

    def _flush_text(self, events: list[Event]) -> None:
        """Force out everything held (at tts boundaries and at the end). An open tool call
        stays open: its closing tag may still come."""
        if self._pending_ids:
            text = self.tok.decode(self._pending_ids)  # an incomplete tail decodes as U+FFFD
            self._pending_ids.clear()
            self._text(text, events)
        if self._call is None and self._held:
            events.append(TextDelta(self._held, self.in_tts))
            self._held = ""

    def _text(self, text: str, events: list[Event]) -> None:
        """Route decoded text through the tool-call recogniser."""
        while text:
            if self._call is not None:
                # Search only where a new closing tag can be (the call may be long).
                start = max(0, len(self._call) - len(TOOL_CALL_END) + 1)
                self._call += text
                text = ""
                end = self._call.find(TOOL_CALL_END, start)
                if end < 0:
                    return
                inner, text = self._call[:end], self._call[end + len(TOOL_CALL_END):]
                self._call = None
                events.append(parse_tool_call(inner, TOOL_CALL_START + inner + TOOL_CALL_END))
                continue
            buf = self._held + text
            self._held, text = "", ""
            start = buf.find(TOOL_CALL_START)
            if start >= 0:
                if start:
                    events.append(TextDelta(buf[:start], self.in_tts))
                self._call = ""
                text = buf[start + len(TOOL_CALL_START):]
                continue
            keep = _partial_prefix_len(buf, TOOL_CALL_START)
            if keep < len(buf):
                events.append(TextDelta(buf[:len(buf) - keep], self.in_tts))
            self._held = buf[len(buf) - keep:]


def merge_events(events: Iterable[Event]) -> list[Event]:
    """Join neighbouring `AudioCodes`, and `TextDelta`s with the same `spoken` flag."""
    merged: list[Event] = []
    for ev in events:
        last = merged[-1] if merged else None
        if isinstance(ev, AudioCodes) and isinstance(last, AudioCodes):
            merged[-1] = AudioCodes(last.codes + ev.codes)
        elif isinstance(ev, TextDelta) and isinstance(last, TextDelta) and last.spoken == ev.spoken:
            merged[-1] = TextDelta(last.text + ev.text, ev.spoken)
        else:
            merged.append(ev)
    return merged


def parse_output(tokenizer: StepAudioTokenizer, token_ids: Iterable[int],
                 in_tts: bool = False) -> list[Event]:
    """Parse a whole output at once; neighbouring events merged (see `merge_events`)."""
    parser = OutputParser(tokenizer, in_tts=in_tts)
    return merge_events(parser.feed_many(token_ids) + parser.finish())
