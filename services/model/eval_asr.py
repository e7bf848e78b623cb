"""Word error rate of a checkpoint on a folder of WAVs, in-process (issue 5).

A data set is a folder of WAV files plus ``manifest.jsonl``, one JSON object a line::

    {"audio": "x.wav", "text": "three one four", "voice": "en-gb"}

Each clip goes through the same path a user's request takes: the official ASR prompt
(spec §2.3) built by :func:`~stepaudio2.model.prompt.build_prompt`, ``encode_chunks``,
greedy ``generate`` (stop at ``<|EOT|>``), and the output parser (text ids only,
spec §2.1). Reference and hypothesis are normalised (lowercase, punctuation removed,
digit characters spelled as words) and compared word by word with a Levenshtein
alignment written here. The WER is corpus-level: all edits over all reference words.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

MANIFEST = "manifest.jsonl"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NON_WORD = re.compile(r"[^\w\s']|_", re.UNICODE)


def normalize(text: str) -> list[str]:
    """Lowercase, punctuation to spaces, digits spelled out one by one; the words."""
    text = _NON_WORD.sub(" ", text.lower()).replace("'", "")
    text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", text)
    return text.split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Minimum substitutions + deletions + insertions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1,               # deletion
                         cur[j - 1] + 1,            # insertion
                         prev[j - 1] + (r != h))    # substitution or match
        prev = cur
    return prev[-1]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edits, reference words) after :func:`normalize`."""
    r, h = normalize(ref), normalize(hyp)
    return edit_distance(r, h), len(r)


def wer(refs: Iterable[str], hyps: Iterable[str]) -> float:
    """Corpus WER: total edits / total reference words (0.0 for no words and no edits)."""
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = words = 0
    for r, h in zip(refs, hyps):
        e, n = word_errors(r, h)
        edits += e
        words += n
    if words == 0:
        return 0.0 if edits == 0 else float("inf")
    return edits / words


def read_manifest(data_dir: str | Path) -> list[dict[str, Any]]:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{MANIFEST} not found in {data_dir}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "audio" not in row or "text" not in row:
            raise ValueError(f"{path}:{n}: each line needs 'audio' and 'text'")
        rows.append(row)
    return rows


def transcribe(model, audio: Any, max_new_tokens: int = 32) -> str:
    """ASR of one clip (path, bytes or 16 kHz float array) with the official prompt."""
    from stepaudio2.model.parser import OutputParser, TextDelta
    from stepaudio2.model.prompt import asr_messages, build_prompt

    prompt = build_prompt(model.tokenizer, asr_messages(audio))
    embeds = model.encode_chunks(prompt.audio_chunks)
    ids = model.generate(prompt.input_ids, embeds, max_new_tokens=max_new_tokens)
    parser = OutputParser(model.tokenizer)
    events = parser.feed_many(ids) + parser.finish()
    return "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    edits = sum(r["errors"] for r in rows)
    words = sum(r["words"] for r in rows)
    return {"wer": edits / words if words else 0.0, "n": len(rows), "words": words, "errors": edits,
            "utterances_wrong": sum(1 for r in rows if r["errors"])}


def evaluate(model_dir: str | Path | None, data_dir: str | Path, max_new_tokens: int = 32,
             model=None, threads: int | None = None) -> dict[str, Any]:
    """WER of the checkpoint in ``model_dir`` (or an already loaded ``model``) on ``data_dir``.

    Returns ``{"wer", "n", "words", "errors", "utterances_wrong", "per_voice": {voice: same
    keys}, "latency_ms": {"mean", "median", "max"}, "rows": [{"audio", "voice", "ref",
    "hyp", "errors", "words", "ms"}]}``. Latency is per clip, prompt building to parsed text.
    ``threads`` sets torch's intra-op threads for the run (restored after); None keeps them.
    A one-utterance decode of a tiny model gains little from threads and, on a busy
    machine, loses a lot to oversubscription.
    """
    import torch

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _evaluate(model_dir, Path(data_dir), max_new_tokens, model)
    finally:
        torch.set_num_threads(prev)


def _evaluate(model_dir, data_dir: Path, max_new_tokens: int, model) -> dict[str, Any]:
    if model is None:
        from stepaudio2.model.modeling import StepAudio2

        model = StepAudio2.from_pretrained(model_dir)
    return evaluate_with(lambda path: transcribe(model, str(path), max_new_tokens), data_dir)


def evaluate_with(transcribe_fn, data_dir: str | Path) -> dict[str, Any]:
    """WER of ``transcribe_fn(path) -> text`` over a data set (same result shape as
    :func:`evaluate`); the served stack plugs in its gRPC or HTTP client here."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    rows = []
    for item in manifest:
        t0 = time.perf_counter()
        hyp = transcribe_fn(data_dir / item["audio"]).strip()
        ms = (time.perf_counter() - t0) * 1000
        e, n = word_errors(item["text"], hyp)
        rows.append({"audio": item["audio"], "voice": item.get("voice", "?"), "ref": item["text"], "hyp": hyp,
                     "errors": e, "words": n, "ms": round(ms, 1)})
    out = _summary(rows)
    voices = sorted({r["voice"] for r in rows})
    out["per_voice"] = {v: _summary([r for r in rows if r["voice"] == v]) for v in voices}
    ms = [r["ms"] for r in rows] or [0.0]
    out["latency_ms"] = {"mean": round(statistics.fmean(ms), 1), "median": round(statistics.median(ms), 1),
                         "max": round(max(ms), 1)}
    out["rows"] = rows
    return out


def render_report(result: dict[str, Any], title: str = "ASR word error rate", console=None,
                  show_errors: int = 20) -> None:
    """Print a per-voice table, the overall WER and the first few wrong transcripts."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    table = Table(title=title)
    for col in ("voice", "utterances", "words", "errors", "WER"):
        table.add_column(col, justify="left" if col == "voice" else "right")
    for voice, s in result["per_voice"].items():
        table.add_row(voice, str(s["n"]), str(s["words"]), str(s["errors"]), f"{100 * s['wer']:.2f}%")
    table.add_row("[bold]all[/bold]", str(result["n"]), str(result["words"]), str(result["errors"]),
                  f"[bold]{100 * result['wer']:.2f}%[/bold]")
    con.print(table)
    wrong = [r for r in result["rows"] if r["errors"]]
    for r in wrong[:show_errors]:
        con.print(f"  {r['audio']} ({r['voice']}): ref {r['ref']!r}  hyp {r['hyp']!r}")
    if len(wrong) > show_errors:
        con.print(f"  ... and {len(wrong) - show_errors} more wrong utterances")
    lat = result["latency_ms"]
    con.print(f"WER {100 * result['wer']:.2f}% over {result['n']} utterances ({result['words']} words); "
              f"latency per utterance {lat['mean']:.0f} ms mean, {lat['median']:.0f} ms median")
