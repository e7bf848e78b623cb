"""Prompt builder for Step-Audio 2 (spec §2.3, §4.2), torch-free.

Mirrors the reference `StepAudio2.apply_chat_template` (stepaudio2.py): each message becomes
string pieces (and raw token lists), every string piece is tokenised on its own with the
normal tokenizer (no BOS) and the ids are concatenated. Audio is cut into <=25 s chunks, one
`<audio_start><audio_patch>*N<audio_end>` run per chunk (spec §1.2, §1.5, §1.6).

Messages: `{"role": "system"|"human"|"user"|"assistant"|"input"|"tool_json_schemas",
"content": str | list[item] | None, "eot": bool = True}`; `user` is written as `human`.
Items: `{"type": "text", "text": str}`, `{"type": "audio", "audio": array | path | bytes}`,
`{"type": "token", "token": [ids]}`. The generation prompt is part of the messages: a last
assistant message with `content=None` (text reply) or `"<tts_start>"` and `eot=False`
(spoken reply), as in the reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from stepaudio2.model import audio as audio_io
from stepaudio2.model.tokenizer import BOT, EOT, TTS_START, StepAudioTokenizer
from stepaudio2.runtime.errors import InvalidArgument

ROLES = frozenset({"system", "human", "user", "assistant", "input", "tool_json_schemas"})
ITEM_TYPES = frozenset({"text", "audio", "token"})

# Task prompts, exactly as in the official examples (spec §2.3, §4.2).
ASR_PROMPT = "请记录下你所听到的语音内容。"
S2TT_PROMPTS = {
    "zh": "请仔细聆听这段语音，然后将其内容翻译成中文。",
    "en": "Please listen carefully to this audio and then translate its content into English.",
}
S2ST_PROMPTS = {
    "zh": "请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。",
    # The examples comment an English variant for Chinese output; this is its English-target twin.
    "en": "Please listen carefully to this audio and then translate its content into English speech.",
}
CAPTION_PROMPT = "Please briefly explain the important events involved in this audio clip."
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TOOL_RESULT_INSTRUCTION = "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"
TTS_BASE_INSTRUCTION = "以自然的语速读出下面的文字。\n"


@dataclass
class Prompt:
    """Token ids of a prompt and the audio that fills its `<audio_patch>` runs.

    `audio_chunks[i]` (16 kHz float32, <=25 s) fills the i-th run of `<audio_patch>` ids,
    whose length is `patch_counts[i]` (spec §1.5, §1.6).
    """

    input_ids: list[int] = field(default_factory=list)
    audio_chunks: list[np.ndarray] = field(default_factory=list)
    patch_counts: list[int] = field(default_factory=list)


class _Builder:
    def __init__(self, tokenizer: StepAudioTokenizer):
        self.tok = tokenizer
        self.prompt = Prompt()

    def text(self, piece: str) -> None:
        # Each string piece is tokenised separately (spec §2.3).
        self.prompt.input_ids.extend(self.tok.encode(piece))

    def tokens(self, ids: Any, where: str) -> None:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InvalidArgument("a token item needs a list of token ids", field=where)
        vocab = len(self.tok)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)) \
                    or not 0 <= int(token_id) < vocab:
                raise InvalidArgument(f"token id {token_id!r} is not an id below {vocab}", field=where)
        self.prompt.input_ids.extend(int(t) for t in ids)

    def audio(self, src: Any) -> None:
        sp = self.tok.special
        waveform = audio_io.load_audio(src)           # 16 kHz mono float (spec §1.2)
        for chunk in audio_io.chunk_audio(waveform):  # <=25 s each (spec §1.2)
            n = audio_io.audio_patch_count(audio_io.mel_frames(len(chunk)))
            # Same ids as tokenising "<audio_start>" + "<audio_patch>"*n + "<audio_end>".
            self.prompt.input_ids.extend([sp.audio_start] + [sp.audio_patch] * n + [sp.audio_end])
            if n > 0:  # a chunk too short for one patch has no run to fill (spec §1.6)
                self.prompt.audio_chunks.append(np.asarray(chunk, dtype=np.float32))
                self.prompt.patch_counts.append(n)

    def item(self, item: Any, where: str) -> None:
        if not isinstance(item, Mapping):
            raise InvalidArgument(f"a content item must be an object, got {type(item).__name__}",
                                  field=where)
        kind = item.get("type")
        if kind not in ITEM_TYPES:
            raise InvalidArgument(f"unknown item type {kind!r} (expected text, audio or token)",
                                  field=f"{where}.type")
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise InvalidArgument("a text item needs a string 'text'", field=f"{where}.text")
            self.text(text)
        elif kind == "audio":
            if item.get("audio") is None:
                raise InvalidArgument("an audio item needs 'audio'", field=f"{where}.audio")
            self.audio(item["audio"])
        else:
            self.tokens(item.get("token"), f"{where}.token")


def build_prompt(tokenizer: StepAudioTokenizer, messages: Sequence[Mapping[str, Any]]) -> Prompt:
    """Ids and audio of a chat prompt (spec §2.3, reference `apply_chat_template`).

    Raises InvalidArgument naming the field for an unknown role, item type or content type,
    and whatever `load_audio` raises for audio it cannot use.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgument("messages must be a list of message objects", field="messages")
    b = _Builder(tokenizer)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidArgument(f"a message must be an object, got {type(msg).__name__}", field=where)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"unknown role {role!r} (expected one of {sorted(ROLES)})",
                                  field=f"{where}.role")
        if role == "user":
            role = "human"
        eot = msg.get("eot", True)
        if not isinstance(eot, bool):
            raise InvalidArgument("eot must be true or false", field=f"{where}.eot")
        if "content" not in msg:
            raise InvalidArgument("a message needs 'content' (null for a generation prefix)",
                                  field=f"{where}.content")
        content = msg["content"]
        if isinstance(content, str):
            # One piece: "<|BOT|>{role}\n{content}<|EOT|>" (spec §2.3).
            b.text(f"{BOT}{role}\n{content}" + (EOT if eot else ""))
        elif isinstance(content, (list, tuple)):
            b.text(f"{BOT}{role}\n")
            for j, item in enumerate(content):
                b.item(item, f"{where}.content[{j}]")
            if eot:
                b.text(EOT)
        elif content is None:
            b.text(f"{BOT}{role}\n")     # generation prefix, never closed
        else:
            raise InvalidArgument(
                f"content must be a string, a list of items or null, got {type(content).__name__}",
                field=f"{where}.content")
    return b.prompt


def build_base_prompt(tokenizer: StepAudioTokenizer, pieces: Sequence[Any]) -> Prompt:
    """Prompt for the Base model: plain pieces, no role markup (spec §2.3, `examples-base.py`).

    Each piece is a string, an item (`{"type": ...}`) or a list of token ids.
    """
    if isinstance(pieces, (str, bytes, Mapping)) or not isinstance(pieces, Sequence):
        raise InvalidArgument("pieces must be a list", field="pieces")
    b = _Builder(tokenizer)
    for i, piece in enumerate(pieces):
        where = f"pieces[{i}]"
        if isinstance(piece, str):
            b.text(piece)
        elif isinstance(piece, Mapping):
            b.item(piece, where)
        elif isinstance(piece, (list, tuple, np.ndarray)):
            b.tokens(piece, where)
        else:
            raise InvalidArgument(f"unsupported piece type {type(piece).__name__}", field=where)
    return b.prompt


# -- message helpers (spec §2.3 task table) -------------------------------------------------------

def audio_item(audio: Any) -> dict[str, Any]:
    return {"type": "audio", "audio": audio}


def assistant_prefix(speech_out: bool) -> dict[str, Any]:
    """The generation prompt: `<tts_start>` with no EOT for speech, else an open turn (spec §2.3)."""
    if speech_out:
        return {"role": "assistant", "content": TTS_START, "eot": False}
    return {"role": "assistant", "content": None}


def _audio_task(system: str, audio: Any, speech_out: bool) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": system},
        {"role": "human", "content": [audio_item(audio)]},
        assistant_prefix(speech_out),
    ]


def _target_prompt(prompts: Mapping[str, str], target: str) -> str:
    if target not in prompts:
        raise InvalidArgument(f"unsupported target language {target!r} (expected {sorted(prompts)})",
                              field="target")
    return prompts[target]


def asr_messages(audio: Any) -> list[dict[str, Any]]:
    """Speech recognition: the official ASR system prompt, text reply (spec §2.3)."""
    return _audio_task(ASR_PROMPT, audio, speech_out=False)


def s2tt_messages(audio: Any, target: str = "zh") -> list[dict[str, Any]]:
    """Speech-to-text translation into `target` ("zh" or "en"), text reply (spec §2.3)."""
    return _audio_task(_target_prompt(S2TT_PROMPTS, target), audio, speech_out=False)


def s2st_messages(audio: Any, target: str = "zh") -> list[dict[str, Any]]:
    """Speech-to-speech translation, assistant prefilled with `<tts_start>` (spec §2.3)."""
    return _audio_task(_target_prompt(S2ST_PROMPTS, target), audio, speech_out=True)


def caption_messages(audio: Any) -> list[dict[str, Any]]:
    """Audio caption, text reply (spec §2.3)."""
    return _audio_task(CAPTION_PROMPT, audio, speech_out=False)


def _is_history(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m for m in value))


def chat_messages(history_or_user_content: Any, system: str | None = DEFAULT_SYSTEM_PROMPT,
                  speech_out: bool = False) -> list[dict[str, Any]]:
    """A chat turn (spec §2.3): system, then the history (a list of messages) or one human turn
    with the given content (a string or a list of items), then the assistant prefix.

    A history that already starts with a system message keeps it; `system=None` adds none.
    """
    if _is_history(history_or_user_content):
        turns = [dict(m) for m in history_or_user_content]
    else:
        turns = [{"role": "human", "content": history_or_user_content}]
    messages: list[dict[str, Any]] = []
    if system is not None and turns[0].get("role") != "system":
        messages.append({"role": "system", "content": system})
    return messages + turns + [assistant_prefix(speech_out)]


def tool_messages(system: str, tools: Sequence[Mapping[str, Any]], user_content: Any,
                  speech_out: bool = True) -> list[dict[str, Any]]:
    """Agent turn with tools (spec §4.2): the `tool_json_schemas` turn right after the system
    turn holds the OpenAI-style function list as one JSON line (`ensure_ascii=False`)."""
    if not isinstance(tools, (list, tuple)):
        raise InvalidArgument("tools must be a list of function schemas", field="tools")
    return [
        {"role": "system", "content": system},
        {"role": "tool_json_schemas", "content": json.dumps(list(tools), ensure_ascii=False)},
        {"role": "human", "content": user_content},
        assistant_prefix(speech_out),
    ]


def tool_result_message(text: str, instruction: str | None = TOOL_RESULT_INSTRUCTION) -> dict[str, Any]:
    """A tool result as an `input` turn: the result, then the instruction (spec §4.2)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if instruction:
        content.append({"type": "text", "text": instruction})
    return {"role": "input", "content": content}


def tts_base_prompt(text: str) -> list[str]:
    """Base-model TTS pieces (spec §2.3): instruction line, then the text and `<tts_start>`."""
    return [TTS_BASE_INSTRUCTION, text + TTS_START]
