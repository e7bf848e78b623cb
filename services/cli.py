"""The `stepaudio2` command line."""
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


DEMO_CHECKPOINT = ROOT / "assets" / "demo-checkpoint"


def _resolve_model_dir(arg: str | None) -> Path:
    """--model-dir, else STEPAUDIO2_MODEL_DIR, else the shipped demo checkpoint (a small
    Step-Audio 2 trained on synthetic spoken digits, assets/demo-checkpoint/README.md)."""
    from stepaudio2.runtime.settings import ModelSettings

    s = ModelSettings()
    if arg:
        return Path(arg)
    if s.model_dir:
        return s.model_dir
    if (DEMO_CHECKPOINT / "config.json").exists():
        return DEMO_CHECKPOINT
    tiny = s.cache_dir / "tiny-checkpoint"  # a checkout without assets/: random weights
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


def cmd_synthesize(args) -> int:
    """Text -> speech in-process: TTS prompt -> LLM -> speech codes -> streaming token2wav
    (the same protocol and pieces as the served Synthesize) -> an audio file."""
    import numpy as np
    import soundfile as sf
    import torch

    from stepaudio2.model.parser import AudioCodes, OutputParser
    from stepaudio2.model.token2wav import Token2Wav, VoiceEncoder
    from stepaudio2.orchestrator.tts import SAMPLE_RATE, SpeechChunker, check_speed, time_stretch, tts_prompt
    from stepaudio2.runtime.errors import InvalidArgument
    from stepaudio2.runtime.voice_store import ASSETS_VOICES, BUILTIN_VOICES

    out = Path(args.out)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3"}.get(out.suffix.lower())
    if fmt is None:
        raise InvalidArgument(f"--out must end in .wav, .flac or .mp3, got {out.name!r}", field="out")
    speed = check_speed(args.speed)
    model_dir = _resolve_model_dir(args.model_dir)
    if args.voice_wav:
        clip = Path(args.voice_wav)
    elif args.voice in BUILTIN_VOICES:
        clip = ASSETS_VOICES / f"{args.voice}.wav"
    else:
        raise InvalidArgument(f"--voice must be one of {sorted(BUILTIN_VOICES)} (or give --voice-wav)", field="voice")
    t0 = time.perf_counter()
    model = _load(model_dir, args.dtype, args.device)
    t2w = Token2Wav.from_pretrained(model_dir, device=args.device)
    voice = VoiceEncoder.from_pretrained(model_dir).encode(clip.read_bytes(), voice_id="cli")
    sp = model.tokenizer.special
    prompt = tts_prompt(model.tokenizer, args.text, args.prompt_style)
    extra = {"min_tokens": args.min_tokens}
    if args.speech_only:    # a real sampling control: only speech codes (and the stop tokens)
        extra["allowed_token_ids"] = list(range(sp.audio_code_base, sp.audio_code_base + sp.num_audio_codes)) + \
            [sp.eot, sp.tts_end]
    t1 = time.perf_counter()
    ids = model.generate(prompt.input_ids, [], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                         stop_ids=[sp.eot, sp.tts_end], **extra)
    t2 = time.perf_counter()
    parser = OutputParser(model.tokenizer, in_tts=True)
    codes = [c for e in parser.feed_many(ids) + parser.finish() if isinstance(e, AudioCodes) for c in e.codes]
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    pieces = []
    if codes:
        stream = t2w.stream(voice.prompt_tokens, voice.prompt_mel, voice.speaker_embedding, generator=gen)
        chunker = SpeechChunker()
        pieces = [stream.push(c).numpy() for c in chunker.feed(codes)]
        pieces.append(stream.push(chunker.finish(), last=True).numpy())
    wav = time_stretch(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), speed)
    t3 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, wav if wav.size else np.zeros(1, np.float32), SAMPLE_RATE, format=fmt)
    print(json.dumps({"out": str(out), "seconds": round(wav.size / SAMPLE_RATE, 3), "speech_codes": len(codes),
                      "generated_tokens": len(ids), "load_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
                      "token2wav_s": round(t3 - t2, 2)}, indent=2))
    if not codes:
        print("the model produced no speech codes (random or ASR-only weights?): try --speech-only --min-tokens N",
              file=sys.stderr)
    return 0


def _demo_http(stack, wav: Path) -> dict:
    """Transcribe ``wav`` through the gateway: the OpenAI SDK when installed, else httpx."""
    t0 = time.perf_counter()
    try:
        import openai
    except ImportError:
        import httpx

        with wav.open("rb") as f:
            r = httpx.post(f"{stack.http_url}/v1/audio/transcriptions", timeout=600,
                           headers={"Authorization": f"Bearer {stack.api_key}"},
                           files={"file": (wav.name, f, "audio/wav")},
                           data={"model": stack.model_id, "response_format": "verbose_json"})
        r.raise_for_status()
        out, client = r.json(), "httpx"
    else:
        api = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.api_key, max_retries=0, timeout=600)
        with wav.open("rb") as f:
            out = api.audio.transcriptions.create(model=stack.model_id, file=f,
                                                  response_format="verbose_json").model_dump()
        client = "openai SDK"
    return {"client": client, "url": f"{stack.http_url}/v1/audio/transcriptions", "text": out["text"],
            "duration_s": out["duration"], "segments": len(out.get("segments") or []),
            "ms": round((time.perf_counter() - t0) * 1000, 1)}


def _demo_speech(stack, text: str, out: Path, drive: bool) -> dict:
    """Speak ``text`` through the gateway into ``out`` (wav). ``drive``: random weights,
    so sample only speech codes (a real sampling control), 2 s worth."""
    import httpx

    body = {"model": stack.model_id, "input": text, "voice": "default_female", "response_format": "wav"}
    if drive:
        from stepaudio2.model.tokenizer import StepAudioTokenizer

        sp = StepAudioTokenizer.from_dir(stack.model_dir).special
        body.update(min_tokens=50, max_tokens=50, seed=0, allowed_token_ids=list(
            range(sp.audio_code_base, sp.audio_code_base + sp.num_audio_codes - 1)) + [sp.eot])
    t0 = time.perf_counter()
    first = None
    out.parent.mkdir(parents=True, exist_ok=True)
    with httpx.stream("POST", f"{stack.http_url}/v1/audio/speech", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {stack.api_key}"}) as r:
        r.raise_for_status()
        with out.open("wb") as f:
            for data in r.iter_bytes():
                first = first or time.perf_counter() - t0
                f.write(data)
    seconds = (out.stat().st_size - 44) / 2 / 24_000
    return {"out": str(out), "audio_s": round(seconds, 2), "first_audio_ms": round((first or 0) * 1000, 1),
            "ms": round((time.perf_counter() - t0) * 1000, 1), **({"note": "random weights: noise"} if drive else {})}


def _demo_grpc(stack, wav: Path) -> dict:
    """Transcribe ``wav`` through the orchestrator's public gRPC API (stepaudio2.v1.Assistant)."""
    import grpc

    from stepaudio2.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    t0 = time.perf_counter()
    with grpc.insecure_channel(stack.grpc_address, options=[("grpc.max_send_message_length", -1)]) as channel:
        resp = assistant_pb2_grpc.AssistantStub(channel).Transcribe(
            assistant_pb2.TranscribeRequest(audio=common_pb2.AudioChunk(data=wav.read_bytes()), model=stack.model_id),
            metadata=[("authorization", f"Bearer {stack.api_key}")], timeout=600)
    return {"client": "grpc", "address": stack.grpc_address, "text": resp.text, "duration_s": round(resp.duration_s, 3),
            "segments": len(resp.segments), "prompt_tokens": resp.usage.prompt_tokens,
            "completion_tokens": resp.usage.completion_tokens, "ms": round((time.perf_counter() - t0) * 1000, 1)}


def cmd_demo(args) -> int:
    """The served stack on loopback (Triton + orchestrator + gateway, ``LocalStack``):
    the bundled WAV transcribed over HTTP (OpenAI-compatible) and over gRPC, then
    everything that was started is stopped."""
    from stepaudio2.stack import LocalStack

    con = _console()
    t0 = time.perf_counter()
    model_dir = _resolve_model_dir(args.model_dir)
    wav = Path(args.audio) if args.audio else DEMO_WAV
    repo_options = {} if args.dtype in (None, "auto") else {"dtype": args.dtype}
    con.print(f"[bold]Step-Audio 2[/bold] demo: starting Triton, orchestrator and gateway on loopback for {model_dir}")
    with LocalStack(model_dir, device="gpu" if args.device.startswith("cuda") else "cpu", repo_options=repo_options,
                    orchestrator_options={"max_tokens_per_segment": args.max_new_tokens}) as stack:
        t_up = time.perf_counter() - t0
        con.print(f"stack ready in {t_up:.1f} s: HTTP {stack.http_url}/v1  gRPC {stack.grpc_address}  "
                  f"Triton {stack.triton.urls.grpc} (pid {stack.triton.pid})  model {stack.model_id!r}")
        if "tiny-checkpoint" in str(model_dir):
            con.print("[yellow]random tiny weights: the transcripts below are noise; set STEPAUDIO2_MODEL_DIR to a "
                      "real checkpoint for real ones[/yellow]")
        elif model_dir.resolve() == DEMO_CHECKPOINT.resolve():
            con.print("[cyan]the shipped demo checkpoint: a 2.5 M-parameter Step-Audio 2 trained on synthetic "
                      "(espeak-ng) spoken digits; it does not transcribe real human speech "
                      "(assets/demo-checkpoint/README.md)[/cyan]")
        ref = wav.with_suffix(".txt")
        con.print(f"\n[bold]ASR[/bold] of {wav.name}" + (f" (reference: {ref.read_text().strip()!r})"
                                                          if ref.exists() else ""))
        http = _demo_http(stack, wav)
        con.print("[bold]HTTP[/bold]", http)
        con.print("[bold]gRPC[/bold]", _demo_grpc(stack, wav))
        if stack.serves_speech:
            text = http["text"].strip() or "Hello from Step-Audio 2."
            con.print(f"\n[bold]TTS[/bold] of {text!r} (POST /v1/audio/speech, voice default_female)")
            con.print("[bold]HTTP[/bold]", _demo_speech(stack, text, Path(args.speech_out),
                                                         drive="tiny-checkpoint" in str(model_dir)))
        else:
            con.print(f"\n[dim]text to speech skipped: {model_dir.name} has no token2wav/ (ASR only)[/dim]")
        t_stop = time.perf_counter()
    con.print(f"\nstopped gateway, orchestrator and Triton in {time.perf_counter() - t_stop:.1f} s "
              f"(demo total {time.perf_counter() - t0:.1f} s)")
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

    s = sub.add_parser("synthesize", help="text to speech in-process (TTS prompt, spec §2.3; token2wav §3.6)")
    s.add_argument("text")
    s.add_argument("--out", required=True, help="output file: .wav, .flac or .mp3 (24 kHz mono)")
    s.add_argument("--voice", default="default_female", help="a built-in voice (default_female, default_male)")
    s.add_argument("--voice-wav", default=None, help="or a reference recording (>= 1 s of speech)")
    s.add_argument("--prompt-style", choices=["chat", "base"], default="chat")
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--repetition-penalty", type=float, default=1.05)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--speech-only", action="store_true", help="sample only speech codes (allowed-token set)")
    model_args(s)
    s.set_defaults(fn=cmd_synthesize, max_new_tokens=2048)

    s = sub.add_parser("demo", help="start the served stack on loopback and transcribe the bundled WAV over HTTP "
                                    "and gRPC")
    s.add_argument("--audio", default=None)
    s.add_argument("--speech-out", default=".cache/demo/reply.wav",
                   help="where the TTS part writes its audio (checkpoints with token2wav/ only)")
    model_args(s)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("info", help="describe a checkpoint folder")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_info)

    def cmd_train_demo(a) -> int:
        from stepaudio2.model.train_demo import train_demo

        s = train_demo(a.out, minutes=a.minutes, seed=a.seed, steps=a.steps, work_dir=a.work_dir,
                       threads=a.threads or None, max_digits=a.max_digits)
        print(json.dumps({k: v for k, v in s.items() if k != "history"}, indent=2))
        return 0

    def cmd_eval_asr(a) -> int:
        from stepaudio2.model.eval_asr import evaluate, render_report

        model_dir = Path(a.model_dir) if a.model_dir else ROOT / "assets" / "demo-checkpoint"
        if a.served:
            from stepaudio2.evaluation import evaluate_served
            from stepaudio2.stack import LocalStack

            with LocalStack(model_dir, orchestrator_options={"max_tokens_per_segment": a.max_new_tokens}) as stack:
                res = evaluate_served(a.dir, grpc_address=stack.grpc_address, api_key=stack.api_key) \
                    if a.served == "grpc" else \
                    evaluate_served(a.dir, http_url=stack.http_url, api_key=stack.api_key, model=stack.model_id)
        else:
            res = evaluate(model_dir, a.dir, max_new_tokens=a.max_new_tokens, threads=a.threads or None)
        if a.json:
            print(json.dumps(res, indent=2, ensure_ascii=False))
        else:
            render_report(res, title=f"ASR of {a.dir} by {model_dir}", console=_console())
        return 0

    s = sub.add_parser("train-demo", help="train the small digit-ASR demo checkpoint on espeak-ng speech (CPU)")
    s.add_argument("out", help="checkpoint folder to write")
    s.add_argument("--minutes", type=float, default=15.0, help="training time budget (default 15)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="fixed step count (step-based schedule, reproducible)")
    s.add_argument("--work-dir", default=None, help="speech/feature cache (default .cache/train-demo)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    s.add_argument("--max-digits", type=int, default=8, help="longest training digit string (default 8)")
    s.set_defaults(fn=cmd_train_demo)

    s = sub.add_parser("eval-asr", help="word error rate of a checkpoint on a folder of WAVs + manifest.jsonl")
    s.add_argument("dir", help="data folder: WAVs + manifest.jsonl")
    s.add_argument("--model-dir", default=None, help="checkpoint folder (default: assets/demo-checkpoint)")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--served", choices=["grpc", "http"], default=None,
                   help="start the served stack (Triton + orchestrator + gateway) and evaluate through it")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    s.set_defaults(fn=cmd_eval_asr)

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
