"""A tiny but real Step-Audio 2 tokenizer for tests and tiny checkpoints (PUBLIC_API.md).

`write_tiny_tokenizer` trains a small byte-level BPE with the `tokenizers` library (Qwen2
normalizer and pre-tokenizer) on a built-in corpus, then writes the same file set as the
real Step-Audio-2-mini checkpoint (spec §5.1): `vocab.json`, `merges.txt`,
`added_tokens.json`, `tokenizer_config.json`, `special_tokens_map.json`, and no
`tokenizer.json`. The added tokens follow the BPE vocabulary in the real order (spec §2.1),
so the offsets between special tokens are the real ones; only the base differs.

Torch-free (house rule, ARCHITECTURE.md).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from stepaudio2.model.tokenizer import QWEN2_PRETOKENIZE_REGEX, AddedTokenSpec, audio_token

# Qwen2.5's own added tokens, in Qwen2.5's order, ids 151643-151664 in the real vocabulary.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
# Qwen2.5 flags these two `special: false` (they stay in text decoded with skip_special_tokens).
QWEN25_NON_SPECIAL = frozenset({"<tool_call>", "</tool_call>"})
# Qwen2.5 lists these as additional_special_tokens (the rest are its eos/pad or non-special).
QWEN25_ADDITIONAL_SPECIAL = QWEN25_ADDED_TOKENS[1:14]

# Step-Audio 2 tokens after Qwen2.5's (spec §2.1): EOT 151665, BOT 151666, 21 reserved
# 151667-151687 (names of the middle ones are not published: ours are invented), audio and
# tts control tokens 151688-151695, then <audio_0>..<audio_6561> 151696-158257.
RESERVED_TOKENS = (
    ("<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
    + tuple(f"<|reserved_{k}|>" for k in range(16))
    + ("<patch_newline>",)
)
CONTROL_TOKENS = (
    "<audio_start>", "<audio_end>", "<audio_patch>", "<audio_patch_pad>", "<|SC|>",
    "<tts_start>", "<tts_end>", "<tts_pad>",
)
NUM_AUDIO_TOKENS = 6562      # codes 0-6560 plus the pad code 6561 (spec §2.1)
REAL_FIRST_ADDED_ID = 151643  # Qwen2.5's BPE vocabulary ends at 151642 (spec §2.1)


def added_token_names() -> list[str]:
    """All added tokens, in id order (spec §2.1)."""
    return (list(QWEN25_ADDED_TOKENS) + ["<|EOT|>", "<|BOT|>"] + list(RESERVED_TOKENS)
            + list(CONTROL_TOKENS) + [audio_token(c) for c in range(NUM_AUDIO_TOKENS)])


def real_special_token_layout() -> list[tuple[str, int]]:
    """(token, id) of every added token in the real Step-Audio-2-mini, 151643..158257."""
    return [(name, REAL_FIRST_ADDED_ID + i) for i, name in enumerate(added_token_names())]


# -- training corpus -------------------------------------------------------------------------

_ENGLISH = """\
You are a helpful assistant.
Give me a brief introduction to the Great Wall.
Now write a 4-line poem about it.
Please briefly explain the important events involved in this audio clip.
Please listen carefully to this audio and then translate its content into Chinese.
Please listen carefully to this audio and then translate its content into English.
You are an expert in audio analysis, please analyze the audio content and answer the questions accurately.
Output the final answer in <RESPONSE> </RESPONSE>.
Translate the speech into Chinese.
The quick brown fox jumps over the lazy dog.
Open the door, please. Close the window. Turn on the light.
What is the weather like in Shanghai today?
How much is the opening price of the index this morning?
Tell me a short story about a cat and a dog.
I would like to book a table for two at seven o'clock.
Can you help me set an alarm for six thirty tomorrow morning?
Music is playing, followed by a woman speaking.
The speaker sounds happy and a little excited.
It's a beautiful day, isn't it? Yes, it's lovely.
They're going to the market; we'll meet them there.
Hello world! This is a test of the tokenizer.
Read the following text at a natural pace.
Translate the following text into English and broadcast it with voice.
"""

_CHINESE = """\
请记录下你所听到的语音内容。
请仔细聆听这段语音，然后将其内容翻译成中文。
请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。
请用语音与我交流。
以自然的语速读出下面的文字。
将下面的文本翻译成英文，并用语音播报。
你的名字叫做小跃，是由阶跃星辰公司训练出来的语音大模型。
你具备调用工具解决问题的能力，你需要根据用户的需求和上下文情景，自主选择是否调用系统提供的工具来协助用户。
你情感细腻，观察能力强，擅长分析用户的内容，并作出善解人意的回复，说话的过程中时刻注意用户的感受，富有同理心，提供多样的情绪价值。
今天是2025年8月29日，星期五
请用默认女声与用户交流。
请用口语化形式总结检索结果，简短地回答用户的问题。
你好呀，我是你的AI助手，很高兴认识你！
帮我查一下今天上证指数的开盘价是多少。
听说荡口古镇从下个月开始取消门票了，你知道这事吗。
新闻说九月十九号就免费开放了。好像整个古镇都升级改造了，现在变成开放式街区了。
你是一位经验丰富的音频分析专家，擅长对各种语音音频进行深入细致的分析。
今天天气很好，我们去公园散步吧。
请打开门。请关上窗户。
"""

_TOOL_TEXT = """\
[{"type": "function", "function": {"name": "search", "description": "搜索工具", "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "搜索关键词"}}, "required": ["query"], "additionalProperties": false}}}]
<tool_call>function
search
{"query": "上证指数 开盘价"}</tool_call>
<tool_call>function
get_weather
{"location": "shanghai", "unit": "celsius"}</tool_call>
{"name": "open_door", "arguments": {"room": "kitchen", "force": true, "times": 3}}
function
"""

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUBJECTS = ("the cat", "my friend", "the teacher", "a small robot", "the assistant", "she", "he",
             "we", "they", "the old man")
_VERBS = ("opens", "closes", "reads", "finds", "likes", "sees", "writes", "plays", "hears", "calls")
_OBJECTS = ("the door", "a book", "the window", "some music", "the weather report", "a letter",
            "the radio", "a song", "the phone", "the news")
_ZH_WORDS = ("我们", "今天", "明天", "音乐", "天气", "语音", "朋友", "老师", "城市", "工具",
             "开门", "关窗", "读书", "唱歌", "上海", "北京", "中文", "英文", "翻译", "回答")
_TOOLS = ("search", "get_weather", "get_time", "open_door", "play_music")


def tiny_corpus(seed: int = 0) -> list[str]:
    """The built-in training text: a few hundred lines, the same for the same seed."""
    rng = random.Random(seed)
    lines = _ENGLISH.splitlines() + _CHINESE.splitlines() + _TOOL_TEXT.splitlines()
    lines.append(" ".join(_NUMBER_WORDS))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 25 100 2025 16000 3.14")
    for _ in range(200):
        n = rng.randrange(10)
        lines.append(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                     f"{rng.choice(_OBJECTS)} {_NUMBER_WORDS[n]} times, {n} in digits.")
    for _ in range(120):
        lines.append("".join(rng.choice(_ZH_WORDS) for _ in range(rng.randrange(3, 8))) + "。")
    for _ in range(60):
        tool = rng.choice(_TOOLS)
        arg = rng.choice(_OBJECTS + _ZH_WORDS)
        args = json.dumps({"query": arg, "n": rng.randrange(100)}, ensure_ascii=False)
        lines.append(f"<tool_call>function\n{tool}\n{args}</tool_call>")
    return lines


# -- writer -------------------------------------------------------------------------------------

def _train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    return vocab, merges


def _entry(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_tiny_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 1024, seed: int = 0) -> int:
    """Write a tiny Step-Audio 2 tokenizer file set into `out_dir`; return its vocab size.

    `vocab_size` is the size of the trained BPE vocabulary (256 byte symbols + merges); the
    6615 added tokens come after it. The files are byte-identical for the same arguments.
    """
    if vocab_size < 257:
        raise ValueError("vocab_size must exceed the 256 byte-level symbols")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_bpe(tiny_corpus(seed), vocab_size)
    first = len(vocab)
    specs = [AddedTokenSpec(id=first + i, content=name, special=name not in QWEN25_NON_SPECIAL)
             for i, name in enumerate(added_token_names())]

    def write(name: str, text: str) -> None:
        (out / name).write_text(text, encoding="utf-8", newline="\n")

    def dump(obj: object, **kw: object) -> str:
        return json.dumps(obj, ensure_ascii=False, **kw) + "\n"

    write("vocab.json", dump(vocab))
    write("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # As transformers' save_pretrained writes it: sorted by token, indented.
    write("added_tokens.json", dump({s.content: s.id for s in specs}, indent=2, sort_keys=True))
    additional = list(QWEN25_ADDITIONAL_SPECIAL) + [
        s.content for s in specs[len(QWEN25_ADDED_TOKENS):]]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(s.id): s.to_config() for s in specs},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 16384,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write("tokenizer_config.json", dump(config, indent=2))
    special_map = {
        "additional_special_tokens": additional,
        "eos_token": _entry("<|endoftext|>"),
        "pad_token": _entry("<|endoftext|>"),
    }
    write("special_tokens_map.json", dump(special_map, indent=2))
    return first + len(specs)
