"""`stepaudio2` command line. Later issues add `up`, `triton`, `model-repo`, ..."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_WAV = ROOT / "assets" / "demo_digits.wav"


def _console():
    from rich.console import Console

    return Console(stderr=False)


def cmd_make_tiny_checkpoint(args) -> int:
    from stepaudio2.model.checkpoint import checkpoint_bytes
    from stepaudio2.model.tiny import make_tiny_checkpoint

    t0 = time.perf_counter()
    out = make_tiny_checkpoint(args.dir, seed=args.seed, dims=args.preset, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint ({checkpoint_bytes(out) / 1e6:.1f} MB of weights, {args.dtype}) "
          f"to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _resolve_model_dir(arg: str | None) -> Path:
    from stepaudio2.runtime.settings import ModelSettings

    s = ModelSettings()
    if arg:
        return Path(arg)
    if s.model_dir:
        return s.model_dir
    tiny = s.cache_dir / "tiny-checkpoint"
    if not (tiny / "config.json").exists():
        from stepaudio2.model.tiny import make_tiny_checkpoint

        print(f"no checkpoint given (--model-dir or STEPAUDIO2_MODEL_DIR): writing a tiny random one to {tiny}")
        make_tiny_checkpoint(tiny)
    return tiny


def _load(model_dir: Path, dtype: str | None, device: str):
    from stepaudio2.model import StepAudio2

    return StepAudio2.from_pretrained(model_dir, dtype=None if dtype in (None, "auto") else dtype, device=device)


def _run_task(model, messages, max_new_tokens: int, **sampling) -> dict:
    from stepaudio2.model.parser import AudioCodes, OutputParser, TextDelta, ToolCall, ToolCallError
    from stepaudio2.model.prompt import build_prompt

    t0 = time.perf_counter()
    prompt = build_prompt(model.tokenizer, messages)
    audio = model.encode_chunks(prompt.audio_chunks)
    t1 = time.perf_counter()
    ids = model.generate(prompt.input_ids, audio, max_new_tokens=max_new_tokens, **sampling)
    t2 = time.perf_counter()
    # A spoken prompt ends with <tts_start>: the reply starts inside the spoken section.
    parser = OutputParser(model.tokenizer, in_tts=prompt.input_ids[-1] == model.tokenizer.special.tts_start)
    events = [e for i in ids for e in parser.feed(i)] + parser.finish()
    return {
        "text": "".join(e.text for e in events if isinstance(e, TextDelta)),
        "audio_codes": sum(len(e.codes) for e in events if isinstance(e, AudioCodes)),
        "tool_calls": [{"name": e.name, "arguments": e.arguments} for e in events if isinstance(e, ToolCall)],
        "tool_call_errors": [e.reason for e in events if isinstance(e, ToolCallError)],
        "prompt_tokens": len(prompt.input_ids),
        "generated_tokens": len(ids),
        "encode_ms": round((t1 - t0) * 1000, 1),
        "generate_ms": round((t2 - t1) * 1000, 1),
    }


def cmd_transcribe(args) -> int:
    from stepaudio2.model.prompt import asr_messages

    model = _load(_resolve_model_dir(args.model_dir), args.dtype, args.device)
    res = _run_task(model, asr_messages(args.audio), args.max_new_tokens)
    print(json.dumps(res, ensure_ascii=False, indent=2) if args.json else res["text"])
    return 0


def cmd_demo(args) -> int:
    """In-process demo (this issue); later issues route it through the served stack."""
    from stepaudio2.model.prompt import asr_messages, chat_messages

    con = _console()
    model_dir = _resolve_model_dir(args.model_dir)
    model = _load(model_dir, args.dtype, args.device)
    n_params = sum(p.numel() for p in model.net.parameters())
    con.print(f"[bold]Step-Audio 2[/bold] from {model_dir} ({n_params / 1e6:.2f} M parameters, {model.dtype}, "
              f"loaded in {model.load_seconds:.2f} s)")
    if "tiny-checkpoint" in str(model_dir):
        con.print("[yellow]random tiny weights: the output below is noise; set STEPAUDIO2_MODEL_DIR to a real "
                  "checkpoint for real transcripts[/yellow]")
    wav = Path(args.audio) if args.audio else DEMO_WAV
    con.print(f"\n[bold]ASR[/bold] of {wav.name} (reference: {wav.with_suffix('.txt').read_text().strip()!r})"
              if wav.with_suffix(".txt").exists() else f"\n[bold]ASR[/bold] of {wav.name}")
    res = _run_task(model, asr_messages(str(wav)), args.max_new_tokens)
    con.print(res)
    con.print("\n[bold]Spoken chat[/bold] (speech out, <tts_start> prefill)")
    res = _run_task(model, chat_messages([{"type": "audio", "audio": str(wav)}], speech_out=True),
                    args.max_new_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.05, seed=0)
    con.print(res)
    return 0


def cmd_info(args) -> int:
    from stepaudio2.model.checkpoint import checkpoint_bytes, weight_map
    from stepaudio2.model.config import StepAudio2Config
    from stepaudio2.model.tokenizer import StepAudioTokenizer

    d = Path(args.dir)
    cfg = StepAudio2Config.from_file(d)
    tok = StepAudioTokenizer.from_dir(d)
    info = {"text_config": cfg.text.__dict__, "audio_encoder_config": cfg.audio.__dict__,
            "torch_dtype": cfg.torch_dtype, "tensors": len(weight_map(d)),
            "weights_bytes": checkpoint_bytes(d), "tokenizer_size": len(tok),
            "special_tokens": tok.special.__dict__}
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepaudio2", description="Step-Audio 2 serving platform")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny-checkpoint", help="write a deterministic random checkpoint in the real format")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["tiny", "mid"], default="tiny")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.set_defaults(fn=cmd_make_tiny_checkpoint)

    def model_args(s):
        s.add_argument("--model-dir", default=None, help="checkpoint folder (default: STEPAUDIO2_MODEL_DIR or tiny)")
        s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        s.add_argument("--device", default="cpu")
        s.add_argument("--max-new-tokens", type=int, default=32)

    s = sub.add_parser("transcribe", help="transcribe an audio file in-process (ASR prompt, spec §2.3)")
    s.add_argument("audio")
    s.add_argument("--json", action="store_true")
    model_args(s)
    s.set_defaults(fn=cmd_transcribe)

    s = sub.add_parser("demo", help="run the bundled demo in-process")
    s.add_argument("--audio", default=None)
    model_args(s)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("info", help="describe a checkpoint folder")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_info)

    # Serving commands live beside the code they start.
    from stepaudio2 import stack
    from stepaudio2.runtime import triton_cli

    triton_cli.register(sub)
    stack.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stepaudio2.runtime.errors import StepAudio2Error

    try:
        return args.fn(args)
    except StepAudio2Error as e:
        print(f"error ({e.code}): {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
