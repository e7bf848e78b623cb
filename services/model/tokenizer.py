"""Step-Audio 2 text tokenizer: Qwen2 byte-level BPE plus added tokens (spec §2.1, §5.1).

Loads a checkpoint's tokenizer files with the Hugging Face `tokenizers` library. The real
Step-Audio-2-mini ships `vocab.json` + `merges.txt` + `added_tokens.json` +
`tokenizer_config.json` (no `tokenizer.json`, spec §5.1); some copies carry a
`tokenizer.json`, which wins when present (PUBLIC_API.md, "Checkpoint folders").

Every special id is read from the files, never hard-coded (ARCHITECTURE.md, house rules), so
the tiny tokenizer of `tiny_tokenizer.py` and the real one both work.

Torch-free on purpose (and transformers-free, which may pull torch): the orchestrator and
gateway tokenize without importing torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer

from stepaudio2.runtime.errors import CheckpointError

# Qwen2's pre-tokenizer split pattern, as its tokenizer.json defines it.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Token strings of spec §2.1 (ids come from the files).
ENDOFTEXT = "<|endoftext|>"
BOT = "<|BOT|>"
EOT = "<|EOT|>"
AUDIO_START = "<audio_start>"
AUDIO_END = "<audio_end>"
AUDIO_PATCH = "<audio_patch>"
TTS_START = "<tts_start>"
TTS_END = "<tts_end>"
TTS_PAD = "<tts_pad>"
TOOL_CALL_START = "<tool_call>"   # single tokens in Qwen2.5 (PUBLIC_API.md), else plain text
TOOL_CALL_END = "</tool_call>"


def audio_token(code: int) -> str:
    """`<audio_N>`: speech code N as a token (spec §2.1)."""
    return f"<audio_{code}>"


TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
ADDED_TOKENS_JSON = "added_tokens.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token with its id and matching flags (tokenizer_config `added_tokens_decoder`)."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def to_json(self) -> dict[str, Any]:
        """The entry shape of tokenizer.json's `added_tokens` list."""
        return {
            "id": self.id,
            "content": self.content,
            "single_word": self.single_word,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": self.normalized,
            "special": self.special,
        }

    def to_config(self) -> dict[str, Any]:
        """The entry shape of tokenizer_config.json's `added_tokens_decoder`."""
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        }


def qwen2_tokenizer_dict(
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    added_tokens: Iterable[AddedTokenSpec],
) -> dict[str, Any]:
    """A tokenizer.json-shaped dict of the Qwen2 fast tokenizer.

    Normalizer NFC; pre-tokenizer Split(Qwen2 regex, isolated) then ByteLevel without its
    own regex; BPE without unk or byte fallback; ByteLevel decoder; no post-processor, so
    nothing is added at the start or end (spec §2.3: "no BOS is added").

    `tokenizers` assigns added-token ids in list order after the model vocabulary, whatever
    ids the JSON says, so the list is sorted by id and the loader verifies the ids afterwards.
    """
    added = sorted(added_tokens, key=lambda t: t.id)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [t.to_json() for t in added],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": False,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(vocab),
            "merges": [[a, b] for a, b in merges],
        },
    }


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the prompt builder and output parser need (spec §2.1).

    Read from the tokenizer; `audio_code_base` is the id of `<audio_0>`, and speech code c
    is id `audio_code_base + c` for c < `num_audio_codes`. `audio_pad_code` is the last code
    (6561 in the real files), the filler of the audio stream (spec §2.2).
    """

    endoftext: int
    bot: int
    eot: int
    audio_start: int
    audio_end: int
    audio_patch: int
    tts_start: int
    tts_end: int
    tts_pad: int
    audio_code_base: int
    num_audio_codes: int
    audio_pad_code: int
    tool_call_start: int | None
    tool_call_end: int | None

    def is_audio_code(self, token_id: int) -> bool:
        return self.audio_code_base <= token_id < self.audio_code_base + self.num_audio_codes

    def audio_code(self, token_id: int) -> int:
        """Speech code of an `<audio_N>` id (spec §2.1: id - offset)."""
        return token_id - self.audio_code_base

    def audio_code_id(self, code: int) -> int:
        return self.audio_code_base + code


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file {path.name} is missing in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"tokenizer file {path.name} in {path.parent} is unreadable: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file {path.name} is missing in {path.parent}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"tokenizer file {path.name} in {path.parent} is unreadable: {exc}") from exc
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path.name} line {lineno}: expected two tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _flag(entry: Mapping[str, Any], key: str, default: bool) -> bool:
    value = entry.get(key, default)
    return bool(value) if value is not None else default


def _specs_from_config(config: Mapping[str, Any]) -> list[AddedTokenSpec] | None:
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        return None
    if not isinstance(decoder, Mapping):
        raise CheckpointError(f"{TOKENIZER_CONFIG_JSON}: added_tokens_decoder is not an object")
    specs = []
    for key, entry in decoder.items():
        try:
            token_id = int(key)
            content = entry["content"]
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{TOKENIZER_CONFIG_JSON}: bad added_tokens_decoder entry {key!r}: {exc}") from exc
        if not isinstance(content, str):
            raise CheckpointError(f"{TOKENIZER_CONFIG_JSON}: added token {key} has no string content")
        specs.append(AddedTokenSpec(
            id=token_id,
            content=content,
            special=_flag(entry, "special", True),
            lstrip=_flag(entry, "lstrip", False),
            rstrip=_flag(entry, "rstrip", False),
            normalized=_flag(entry, "normalized", False),
            single_word=_flag(entry, "single_word", False),
        ))
    return specs


def _ids_from_added_tokens_json(data: Any) -> dict[str, int]:
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise CheckpointError(f"{ADDED_TOKENS_JSON}: expected an object of token -> id")
    return dict(data)


def _check_unique(specs: Sequence[AddedTokenSpec], source: str) -> None:
    seen_ids: dict[int, str] = {}
    seen_content: set[str] = set()
    for spec in specs:
        if spec.id in seen_ids:
            raise CheckpointError(
                f"{source}: id {spec.id} is given to both {seen_ids[spec.id]!r} and {spec.content!r}")
        if spec.content in seen_content:
            raise CheckpointError(f"{source}: token {spec.content!r} is listed twice")
        seen_ids[spec.id] = spec.content
        seen_content.add(spec.content)


class StepAudioTokenizer:
    """A checkpoint's tokenizer (spec §2.1): `encode`/`decode` plus the special ids.

    `encode` recognises added tokens inside the text (e.g. `<|BOT|>`, `<audio_patch>`) and adds
    nothing at the start or end, as the reference prompt builder expects (spec §2.3).
    """

    def __init__(self, tokenizer: Tokenizer, *, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = (max(vocab.values()) + 1) if vocab else 0
        decoder = tokenizer.get_added_tokens_decoder()
        # Ids of added tokens flagged special: control tokens, never text (spec §9.4).
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in decoder.items() if tok.special)
        self.added_token_ids: frozenset[int] = frozenset(decoder)
        self.special: SpecialTokens = self._read_special_tokens()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "StepAudioTokenizer":
        """Load from a checkpoint folder (spec §5.1); `tokenizer.json` wins when present.

        Raises CheckpointError naming the missing/broken file, an added token whose id does
        not match, or a required special token that is absent.
        """
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"tokenizer folder {root} does not exist")

        config_path = root / TOKENIZER_CONFIG_JSON
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{TOKENIZER_CONFIG_JSON} is not a JSON object")
        config_specs = _specs_from_config(config)
        added_json_path = root / ADDED_TOKENS_JSON
        added_json_ids = (_ids_from_added_tokens_json(_read_json(added_json_path))
                          if added_json_path.is_file() else None)

        # (file, token, id) triples the loaded tokenizer must reproduce.
        expected: list[tuple[str, str, int]] = []
        if config_specs is not None:
            _check_unique(config_specs, TOKENIZER_CONFIG_JSON)
            expected += [(TOKENIZER_CONFIG_JSON, s.content, s.id) for s in config_specs]
        if added_json_ids is not None:
            expected += [(ADDED_TOKENS_JSON, c, i) for c, i in added_json_ids.items()]

        json_path = root / TOKENIZER_JSON
        if json_path.is_file():
            try:
                text = json_path.read_text(encoding="utf-8")
                data = json.loads(text)
                tokenizer = Tokenizer.from_str(text)
            except Exception as exc:  # tokenizers raises its own Exception type
                raise CheckpointError(f"{TOKENIZER_JSON} in {root} cannot be loaded: {exc}") from exc
            expected += [(TOKENIZER_JSON, t["content"], t["id"])
                         for t in data.get("added_tokens") or []]
            source = str(json_path)
        else:
            vocab = _read_json(root / VOCAB_JSON)
            if not isinstance(vocab, Mapping):
                raise CheckpointError(f"{VOCAB_JSON} is not a JSON object of token -> id")
            merges = _read_merges(root / MERGES_TXT)
            if config_specs is not None:
                specs = config_specs
            elif added_json_ids is not None:
                # added_tokens.json carries no flags: treat every token as special.
                specs = [AddedTokenSpec(id=i, content=c) for c, i in added_json_ids.items()]
                _check_unique(specs, ADDED_TOKENS_JSON)
            else:
                raise CheckpointError(
                    f"tokenizer file {ADDED_TOKENS_JSON} is missing in {root} (and "
                    f"{TOKENIZER_CONFIG_JSON} has no added_tokens_decoder)")
            # Tokens already in vocab.json keep their BPE id; only the others are added.
            specs = [s for s in specs if s.content not in vocab]
            try:
                tokenizer = Tokenizer.from_str(json.dumps(qwen2_tokenizer_dict(vocab, merges, specs)))
            except Exception as exc:
                raise CheckpointError(f"tokenizer files in {root} cannot be assembled: {exc}") from exc
            source = f"{root / VOCAB_JSON} + {MERGES_TXT}"

        for filename, content, token_id in expected:
            got = tokenizer.token_to_id(content)
            if got != token_id:
                raise CheckpointError(
                    f"added token {content!r} has id {token_id} in {filename} but id {got} "
                    f"in the loaded tokenizer ({root})")
        return cls(tokenizer, source=source)

    def _read_special_tokens(self) -> SpecialTokens:
        def required(token: str) -> int:
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise CheckpointError(f"required special token {token!r} is missing from the tokenizer")
            return token_id

        base = required(audio_token(0))
        count = 0
        while True:  # <audio_0>, <audio_1>, ... must be consecutive ids (spec §2.1)
            token_id = self._tok.token_to_id(audio_token(count))
            if token_id is None:
                break
            if token_id != base + count:
                raise CheckpointError(
                    f"audio token {audio_token(count)!r} has id {token_id}, expected {base + count} "
                    f"(<audio_N> ids must be consecutive from <audio_0> = {base})")
            count += 1
        return SpecialTokens(
            endoftext=required(ENDOFTEXT),
            bot=required(BOT),
            eot=required(EOT),
            audio_start=required(AUDIO_START),
            audio_end=required(AUDIO_END),
            audio_patch=required(AUDIO_PATCH),
            tts_start=required(TTS_START),
            tts_end=required(TTS_END),
            tts_pad=required(TTS_PAD),
            audio_code_base=base,
            num_audio_codes=count,
            audio_pad_code=count - 1,
            tool_call_start=self._tok.token_to_id(TOOL_CALL_START),
            tool_call_end=self._tok.token_to_id(TOOL_CALL_END),
        )

    # -- API ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; added tokens inside it become their single ids, nothing is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. With `skip_special_tokens`, tokens flagged special are left out
        (in Qwen2.5 `<tool_call>`/`</tool_call>` are not flagged, so they stay)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Highest id in use + 1 (the model's embedding may be larger, spec §1.7)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def save_tokenizer_json(self, path: str | os.PathLike[str]) -> None:
        """Write the loaded tokenizer as a single tokenizer.json."""
        self._tok.save(str(path))

    def __repr__(self) -> str:
        return f"StepAudioTokenizer(vocab_size={self._vocab_size}, source={self.source!r})"
