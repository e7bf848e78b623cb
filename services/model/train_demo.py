"""Train a small Step-Audio 2 that really transcribes spoken digit strings (issue 5).

``train_demo(out_dir, minutes=15.0, seed=0)`` does everything on CPU with our own code:

1. **Speech.** Random strings of 3-8 digits ("three one four"), spoken by espeak-ng in
   several English voices (accents x voice variants, ``TRAIN_VOICES``) at random speed
   130-190 wpm and pitch 30-70; silence trimmed, random silence added, random level and,
   for half the clips, white noise at 15-40 dB SNR. Resampled to 16 kHz with our
   resampler, cached in a work dir as int16. Digit strings whose CRC-32 is 0 mod 10 are
   *held out*: training never uses them, evaluation sets use only them.
2. **Features.** Our front end's 128-bin log-mel (spec §1.2), precomputed (fp16 cache).
3. **Model.** Our ``StepAudio2Net`` at small dims (``DEMO_DIMS``), initialised like the tiny
   checkpoints (Whisper sinusoids in the encoder's position table, kept frozen).
4. **Task.** The exact ASR prompt of spec §2.3 as ``build_prompt(tok, asr_messages(audio))``
   makes it, then the answer tokens and ``<|EOT|>``. Loss = cross-entropy on the answer
   tokens and the EOT, plus ``ctc_weight`` x an auxiliary CTC loss on the adapter output:
   a throwaway linear head over the ten digit words (+ blank), used in training only and
   not saved. Without it the decoder learns to ignore the audio and guess.
5. **Optimisation.** AdamW (no decay on embeddings, norms, biases), linear warmup then
   cosine, batches of right-padded sequences bucketed by length, gradient clipping. The
   schedule runs on wall-clock progress (elapsed / budget) so it always anneals by the
   deadline; pass ``steps`` for a step-based schedule that is reproducible run to run
   (torch on CPU is deterministic for a fixed seed, thread count and step count).
6. **Checkpoint.** The real on-disk format: tokenizer files (``write_tiny_tokenizer``),
   ``config.json`` (``make_config_dict``), fp32 safetensors shards + index
   (``save_checkpoint``); ``StepAudio2.from_pretrained`` loads it like any other. A
   ``train_demo.json`` beside it records the recipe and the dev-set WER.

Limits: it knows ten words in synthetic espeak voices. It does not transcribe real human
speech, and it produces no speech output.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.audio import SAMPLE_RATE, encoder_input_length, resample
from stepaudio2.model.tiny import TinyDims

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORK_DIR = ROOT / ".cache" / "train-demo"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voices "<accent>+<variant>": 4 accents (en = British), 11 voice variants, 14
# combinations. ("en-gb+<variant>" silently ignores the variant in espeak-ng 1.51: use "en+".)
TRAIN_VOICES = (
    "en-us", "en", "en-us+m3", "en+m1", "en-us+m5", "en+m6", "en-gb-x-rp+m2", "en-us+m8",
    "en-us+f2", "en+f3", "en-us+f1", "en-gb-x-rp+f5", "en-029+m4", "en-029+f2",
)
# Held out from training: a voice variant (f4) never used there, on a seen accent.
UNSEEN_VOICE = "en-us+f4"
SPEED_RANGE = (130, 190)   # words per minute
PITCH_RANGE = (30, 70)     # espeak pitch 0-99
CACHE_VERSION = 1

DEMO_DIMS = TinyDims(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                     audio_state=128, audio_heads=4, audio_layers=3)


# -- speech ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    speed: int
    pitch: int
    pad_start: float           # seconds of silence before the trimmed speech
    pad_end: float
    peak: float | None = None  # scale to this peak level; None keeps espeak's level
    snr_db: float | None = None
    noise_seed: int = 0


def is_held_out(text: str) -> bool:
    """Digit strings reserved for evaluation (about 10%): never used in training."""
    return zlib.crc32(text.encode()) % 10 == 0


def random_digits(rng: random.Random, min_digits: int, max_digits: int, held_out: bool) -> str:
    while True:
        k = rng.randint(min_digits, max_digits)
        text = " ".join(DIGIT_WORDS[rng.randrange(10)] for _ in range(k))
        if is_held_out(text) == held_out:
            return text


def plan_utterances(n: int, seed: int, voices: Sequence[str], *, held_out: bool = False, augment: bool = True,
                    min_digits: int = 3, max_digits: int = 6) -> list[Utterance]:
    """``n`` utterance recipes, the same for the same arguments; voices round-robin."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = random_digits(rng, min_digits, max_digits, held_out)
        u = Utterance(text=text, voice=voices[i % len(voices)], speed=rng.randint(*SPEED_RANGE),
                      pitch=rng.randint(*PITCH_RANGE), pad_start=round(rng.uniform(0.05, 0.4), 3),
                      pad_end=round(rng.uniform(0.05, 0.4), 3))
        if augment:
            u = replace(u, peak=round(rng.uniform(0.1, 0.95), 3),
                        snr_db=round(rng.uniform(15, 40), 1) if rng.random() < 0.5 else None,
                        noise_seed=rng.randrange(2**31))
        out.append(u)
    return out


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as 16 kHz mono float32 (its 22.05 kHz output resampled by us)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; `make install` does it as root)")
    r = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                       capture_output=True, timeout=60)
    data = r.stdout
    if r.returncode != 0 or len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {r.stderr.decode(errors='replace').strip()}")
    # espeak-ng streams a WAV whose size fields are placeholders: read the fmt fields and
    # take every sample after the data chunk header.
    channels = int.from_bytes(data[22:24], "little")
    sr = int.from_bytes(data[24:28], "little")
    bits = int.from_bytes(data[34:36], "little")
    pos = data.find(b"data", 36)
    if channels != 1 or bits != 16 or pos < 0:
        raise RuntimeError(f"unexpected espeak-ng output: {channels} channels, {bits} bits")
    body = data[pos + 8:]
    pcm = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    return resample(pcm, sr, SAMPLE_RATE)


def trim_silence(x: np.ndarray, rel: float = 0.005, margin_s: float = 0.04) -> np.ndarray:
    a = np.abs(x)
    loud = np.flatnonzero(a > rel * max(float(a.max()), 1e-9))
    if loud.size == 0:
        return x
    m = int(margin_s * SAMPLE_RATE)
    return x[max(0, loud[0] - m): loud[-1] + m + 1]


def render(u: Utterance) -> np.ndarray:
    """The 16 kHz float32 waveform of one utterance recipe (deterministic)."""
    speech = trim_silence(espeak(u.text, u.voice, u.speed, u.pitch))
    if u.peak is not None:
        speech = speech * (u.peak / max(float(np.abs(speech).max()), 1e-9))
    x = np.concatenate([np.zeros(int(u.pad_start * SAMPLE_RATE), np.float32), speech,
                        np.zeros(int(u.pad_end * SAMPLE_RATE), np.float32)]).astype(np.float32)
    if u.snr_db is not None:
        rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))
        noise = np.random.default_rng(u.noise_seed).standard_normal(len(x)) * rms / 10 ** (u.snr_db / 20)
        x = x + noise.astype(np.float32)
    # int16 round trip: training sees exactly what a 16-bit WAV file holds.
    return to_int16(x).astype(np.float32) / 32768.0


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def render_all(utts: Sequence[Utterance], workers: int = 2, on_done: Callable[[], None] | None = None
               ) -> list[np.ndarray]:
    def one(u):
        x = render(u)
        if on_done:
            on_done()
        return x

    with ThreadPoolExecutor(max_workers=workers) as pool:  # espeak-ng runs in subprocesses
        return list(pool.map(one, utts))


def _key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached_audio(utts: Sequence[Utterance], work_dir: Path, progress=None) -> list[np.ndarray]:
    """Render ``utts`` once; later calls read ``work_dir/audio-<hash>.npz``."""
    path = work_dir / f"audio-{_key([CACHE_VERSION, [asdict(u) for u in utts]])}.npz"
    if path.exists():
        with np.load(path) as z:
            pcm, offsets = z["pcm"], z["offsets"]
        return [pcm[offsets[i]:offsets[i + 1]].astype(np.float32) / 32768.0 for i in range(len(utts))]
    task = progress.add_task("espeak-ng", total=len(utts)) if progress else None
    waves = render_all(utts, on_done=(lambda: progress.advance(task)) if progress else None)
    offsets = np.cumsum([0] + [len(w) for w in waves])
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pcm=np.concatenate([to_int16(w) for w in waves]), offsets=offsets)
    tmp.rename(path)
    return waves


def write_eval_set(out_dir: str | Path, utts: Sequence[Utterance]) -> Path:
    """Render ``utts`` to ``out_dir/NNN.wav`` (16 kHz 16-bit mono) + ``manifest.jsonl``."""
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (u, x) in enumerate(zip(utts, render_all(utts))):
        name = f"{i:03d}.wav"
        sf.write(out / name, to_int16(x), SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": name, "text": u.text, "voice": u.voice, "speed": u.speed,
                                 "pitch": u.pitch}))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def eval_utterances(n_seen: int, n_unseen: int, seed: int, min_digits: int = 3, max_digits: int = 6
                    ) -> list[Utterance]:
    """Held-out digit strings, clean (no level change or noise): ``n_seen`` in the training
    voices, then ``n_unseen`` in ``UNSEEN_VOICE``."""
    seen = plan_utterances(n_seen, seed, TRAIN_VOICES, held_out=True, augment=False,
                           min_digits=min_digits, max_digits=max_digits)
    unseen = plan_utterances(n_unseen, seed + 1, (UNSEEN_VOICE,), held_out=True, augment=False,
                             min_digits=min_digits, max_digits=max_digits)
    return seen + unseen


def make_eval_set(out_dir: str | Path, n_seen: int = 45, n_unseen: int = 20, seed: int = 20250826) -> Path:
    """The shipped held-out set (``assets/eval-digits``)."""
    return write_eval_set(out_dir, eval_utterances(n_seen, n_unseen, seed))


# -- features and sequences --------------------------------------------------------------------------

@dataclass
class Example:
    mel: torch.Tensor        # [128, F] fp16
    ids: list[int]           # prompt (spec §2.3) + answer + <|EOT|>
    answer_start: int        # index in ids of the first answer token
    digits: list[int]        # CTC targets: digit word index + 1 (0 is the blank)
    voice: str


def make_examples(utts: Sequence[Utterance], waves: Sequence[np.ndarray], tokenizer) -> list[Example]:
    from stepaudio2.model.frontend import log_mel
    from stepaudio2.model.prompt import asr_messages, build_prompt

    eot = tokenizer.special.eot
    out = []
    for u, w in zip(utts, waves):
        prompt = build_prompt(tokenizer, asr_messages(w))
        answer = tokenizer.encode(u.text) + [eot]
        out.append(Example(mel=log_mel(w).to(torch.float16), ids=prompt.input_ids + answer,
                           answer_start=len(prompt.input_ids),
                           digits=[DIGIT_WORDS.index(d) + 1 for d in u.text.split()], voice=u.voice))
    return out


def cached_examples(utts, waves, tokenizer, work_dir: Path) -> list[Example]:
    tok_key = _key([tokenizer.vocab_size, tokenizer.encode(" ".join(DIGIT_WORDS)), tokenizer.special.eot])
    path = work_dir / f"feats-{_key([CACHE_VERSION, [asdict(u) for u in utts], tok_key])}.pt"
    if path.exists():
        return [Example(**d) for d in torch.load(path, weights_only=True)]
    ex = make_examples(utts, waves, tokenizer)
    tmp = path.with_suffix(".tmp")
    torch.save([asdict(e) for e in ex], tmp)
    tmp.rename(path)
    return ex


# -- training forward ------------------------------------------------------------------------------

def rope(cfg, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] for positions 0..length-1, as ``Qwen2Model`` computes them."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def causal_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Full-sequence causal forward of a ``Qwen2Model`` (no cache), differentiable.

    x [B, L, D] right-padded embeddings (positions 0..L-1 for every row) -> final hidden
    states [B, L, D]; rows past a sequence's end are garbage and must not be used. Same
    parameters and math as ``Qwen2Model.forward`` with an empty cache.
    """
    from stepaudio2.model.llm import _rotate_half

    b, n, _ = x.shape
    cos, sin = rope(model.cfg, n)
    cos, sin = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
    for layer in model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, n, a.h, a.hd)
        k = a.k_proj(h).view(b, n, a.kv, a.hd)
        v = a.v_proj(h).view(b, n, a.kv, a.hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=a.h != a.kv)
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, n, a.h * a.hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


@dataclass
class Batch:
    mels: torch.Tensor          # [B, 128, T] float32, zero right-padded
    enc_lens: torch.Tensor      # [B] encoder input lengths (F - 2, spec §1.2)
    ids: torch.Tensor           # [B, L] long
    loss_rows: torch.Tensor     # positions whose next token is an answer token / EOT
    loss_cols: torch.Tensor
    targets: torch.Tensor
    ctc_targets: torch.Tensor   # concatenated
    ctc_lens: torch.Tensor


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    b = len(examples)
    t = max(e.mel.shape[1] for e in examples)
    mels = torch.zeros(b, examples[0].mel.shape[0], t)
    length = max(len(e.ids) for e in examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, e in enumerate(examples):
        mels[i, :, : e.mel.shape[1]] = e.mel.float()
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        for p in range(e.answer_start - 1, len(e.ids) - 1):
            rows.append(i)
            cols.append(p)
            targets.append(e.ids[p + 1])
    enc = torch.tensor([encoder_input_length(e.mel.shape[1]) for e in examples])
    return Batch(mels, enc, ids, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets),
                 torch.tensor([d for e in examples for d in e.digits]),
                 torch.tensor([len(e.digits) for e in examples]))


def batch_loss(net, ctc_head: nn.Module, batch: Batch, patch_id: int, ctc_weight: float
               ) -> tuple[torch.Tensor, float, float]:
    """(loss, cross-entropy, ctc) of one batch."""
    x, enc_lens = net.encoder(batch.mels, batch.enc_lens)
    audio = net.adapter(x)                                          # [B, N, D]
    n_audio = (enc_lens - 1) // 2 + 1                               # spec §1.4
    tok = net.model.embed_tokens(batch.ids)                         # [B, L, D]
    mask = batch.ids == patch_id
    # The i-th <audio_patch> of a row takes the row's i-th adapter vector (spec §1.6).
    idx = (mask.long().cumsum(1) - 1).clamp(0, audio.shape[1] - 1)
    spliced = audio.gather(1, idx[..., None].expand(-1, -1, audio.shape[-1]))
    h = causal_forward(net.model, torch.where(mask[..., None], spliced, tok))
    logits = net.lm_head(h[batch.loss_rows, batch.loss_cols])
    ce = F.cross_entropy(logits, batch.targets)
    if ctc_weight > 0:
        lp = ctc_head(audio).log_softmax(-1).transpose(0, 1)       # [N, B, C]
        ctc = F.ctc_loss(lp, batch.ctc_targets, n_audio, batch.ctc_lens, blank=0, zero_infinity=True)
    else:
        ctc = torch.zeros(())
    return ce + ctc_weight * ctc, float(ce.detach()), float(ctc.detach())


def batch_order(frames: Sequence[int], batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of example indices: each epoch a seeded shuffle, sorted by length
    inside groups of 16 batches (little padding), batches in shuffled order."""
    frames = np.asarray(frames)
    epoch = 0
    while True:
        g = np.random.default_rng([seed, epoch])
        perm = g.permutation(len(frames))
        batches = []
        group = batch_size * 16
        for i in range(0, len(perm), group):
            chunk = perm[i:i + group]
            chunk = chunk[np.argsort(frames[chunk], kind="stable")]
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        for k in g.permutation(len(batches)):
            yield batches[k]
        epoch += 1


def lr_at(progress: float, peak: float, warmup: float = 0.04, floor: float = 0.02) -> float:
    """Linear warmup over the first ``warmup`` of training, then cosine to ``floor`` x peak."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


# -- the whole recipe -------------------------------------------------------------------------------

def demo_config_dict(n_tokens: int, eos_token_id: int, dims: TinyDims = DEMO_DIMS) -> dict:
    from stepaudio2.model.config import make_config_dict

    vocab = ((n_tokens + 127) // 128) * 128  # embedding rows padded past the last id, as in tiny.py
    return make_config_dict(hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
                            num_layers=dims.num_layers, num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                            vocab_size=vocab, audio_state=dims.audio_state, audio_heads=dims.audio_heads,
                            audio_layers=dims.audio_layers, torch_dtype="float32", eos_token_id=eos_token_id)


def save_demo_checkpoint(net, cfg_dict: dict, out_dir: Path, shards: int = 3) -> int:
    """Tokenizer files + config.json + fp32 shards + index; returns the weight bytes."""
    from stepaudio2.model.checkpoint import INDEX_NAME, save_checkpoint
    from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("model-*-of-*.safetensors")) + [out_dir / INDEX_NAME]:
        old.unlink(missing_ok=True)  # a previous run may have written another shard count
    write_tiny_tokenizer(out_dir)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in net.state_dict().items()}
    total = sum(t.numel() * 4 for t in state.values())
    save_checkpoint(state, cfg_dict, out_dir, max_shard_bytes=total // shards + 1)
    return total


def train_demo(out_dir: str | Path, minutes: float = 15.0, seed: int = 0, *, steps: int | None = None,
               work_dir: str | Path | None = None, n_utterances: int = 6000, dims: TinyDims = DEMO_DIMS,
               batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.01, ctc_weight: float = 0.5,
               min_digits: int = 3, max_digits: int = 8, n_dev: int = 56, n_dev_unseen: int = 20,
               threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """Train the digit-ASR demo checkpoint into ``out_dir``; returns the run summary.

    ``minutes`` bounds the training loop (data preparation is cached in ``work_dir``,
    default ``.cache/train-demo``). With ``steps`` the schedule is step-based and
    training stops after exactly that many steps - reproducible for the same seed and
    thread count - unless the time budget runs out first (then the schedule follows the
    clock, as without ``steps``).
    ``n_dev``/``n_dev_unseen`` held-out clips are evaluated at the end (0 skips it).
    ``threads`` (default 1, None = torch's default) sets torch's intra-op threads for the
    run: on a shared machine two threads fighting other jobs for two cores ran 4x slower
    per step than one thread, and a fixed count keeps results reproducible.
    """
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_demo(out_dir, minutes, seed, steps, work_dir, n_utterances, dims, batch_size, lr,
                           weight_decay, ctc_weight, min_digits, max_digits, n_dev, n_dev_unseen, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _train_demo(out_dir, minutes, seed, steps, work_dir, n_utterances, dims, batch_size, lr, weight_decay,
                ctc_weight, min_digits, max_digits, n_dev, n_dev_unseen, progress) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from stepaudio2.model.config import StepAudio2Config
    from stepaudio2.model.modeling import StepAudio2Net
    from stepaudio2.model.tiny import random_state
    from stepaudio2.model.tiny_tokenizer import write_tiny_tokenizer
    from stepaudio2.model.tokenizer import StepAudioTokenizer

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else DEFAULT_WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    con = Console(quiet=not progress)
    torch.manual_seed(seed)

    tok_dir = work / "tokenizer"
    n_tokens = write_tiny_tokenizer(tok_dir)
    tok = StepAudioTokenizer.from_dir(tok_dir)
    sp = tok.special

    # (a) speech, (b) features
    utts = plan_utterances(n_utterances, seed, TRAIN_VOICES, held_out=False, augment=True,
                           min_digits=min_digits, max_digits=max_digits)
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=con, disable=not progress, transient=True) as prog:
        waves = cached_audio(utts, work, progress=prog)
    examples = cached_examples(utts, waves, tok, work)
    audio_seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    del waves
    prep_s = time.perf_counter() - t0
    con.print(f"data: {len(examples)} utterances ({audio_seconds / 60:.1f} min of speech, "
              f"{len(TRAIN_VOICES)} voices) ready in {prep_s:.1f} s")

    # (c) model
    cfg_dict = demo_config_dict(n_tokens, sp.endoftext, dims)
    cfg = StepAudio2Config.from_dict(cfg_dict)
    net = StepAudio2Net(cfg)
    net.load_state_dict(random_state(cfg, seed))
    net.encoder.positional_embedding.weight.requires_grad_(False)  # Whisper sinusoids, fixed
    net.train()
    ctc_head = nn.Linear(cfg.text.hidden_size, len(DIGIT_WORDS) + 1)  # training only, not saved
    decay, no_decay = [], []
    for name, p in list(net.named_parameters()) + [("ctc_head." + n, p) for n, p in ctc_head.named_parameters()]:
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in net.parameters())
    con.print(f"model: {n_params / 1e6:.2f} M parameters (decoder {dims.num_layers}x{dims.hidden_size}, "
              f"encoder {dims.audio_layers}x{dims.audio_state}), batch {batch_size}, "
              f"budget {minutes:g} min" + (f", {steps} steps" if steps else ""))

    order = batch_order([e.mel.shape[1] for e in examples], batch_size, seed)
    budget = minutes * 60.0
    history: list[dict[str, float]] = []
    ema = None
    step = 0
    t_train = last_line = time.perf_counter()
    with Progress(TextColumn("[bold]train[/bold]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("step {task.fields[step]}  loss {task.fields[loss]}  ce {task.fields[ce]}  "
                             "ctc {task.fields[ctc]}  lr {task.fields[lr]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=con, disable=not progress) as prog:
        task = prog.add_task("train", total=1.0, step=0, loss="-", ce="-", ctc="-", lr="-")
        while True:
            elapsed = time.perf_counter() - t_train
            time_p = elapsed / budget if budget > 0 else 1.0
            # Step-based when steps are given; the clock still wins if it runs out first, so
            # the learning rate always anneals by the deadline.
            p = max(step / steps, time_p) if steps else time_p
            if p >= 1.0 or time_p >= 1.0:
                break
            cur_lr = lr_at(p, lr)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            batch = collate([examples[i] for i in next(order)], sp.endoftext)
            loss, ce, ctc = batch_loss(net, ctc_head, batch, sp.audio_patch, ctc_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decay + no_decay, 1.0)
            opt.step()
            step += 1
            cur = (float(loss.detach()), ce, ctc)
            ema = cur if ema is None else tuple(0.95 * a + 0.05 * b for a, b in zip(ema, cur))
            if step % 10 == 0 or step == 1:
                history.append({"step": step, "seconds": round(time.perf_counter() - t_train, 1),
                                "loss": round(ema[0], 4), "ce": round(ema[1], 4), "ctc": round(ema[2], 4),
                                "lr": cur_lr})
            prog.update(task, completed=min(1.0, p), step=step,
                        loss=f"{ema[0]:.3f}", ce=f"{ema[1]:.3f}", ctc=f"{ema[2]:.3f}", lr=f"{cur_lr:.1e}")
            if progress and not con.is_terminal and time.perf_counter() - last_line >= 60:
                last_line = time.perf_counter()  # a log file gets a plain line a minute
                con.print(f"step {step}  {last_line - t_train:.0f} s  loss {ema[0]:.3f}  ce {ema[1]:.3f}  "
                          f"ctc {ema[2]:.3f}  lr {cur_lr:.1e}")
    train_s = time.perf_counter() - t_train
    net.eval()

    # (d) checkpoint in the real format
    weight_bytes = save_demo_checkpoint(net, cfg_dict, out_dir)
    con.print(f"trained {step} steps in {train_s / 60:.1f} min; wrote {weight_bytes / 1e6:.1f} MB of fp32 weights "
              f"to {out_dir}")
    summary: dict[str, Any] = {
        "recipe": {"seed": seed, "minutes": minutes, "steps_requested": steps, "n_utterances": n_utterances,
                   "digits": [min_digits, max_digits], "voices": list(TRAIN_VOICES),
                   "speed_wpm": list(SPEED_RANGE), "pitch": list(PITCH_RANGE), "batch_size": batch_size,
                   "lr": lr, "weight_decay": weight_decay, "ctc_weight": ctc_weight, "dims": asdict(dims),
                   "optimizer": "AdamW(0.9, 0.98), 4% warmup, cosine to 2%, grad clip 1.0"},
        "steps": step, "train_seconds": round(train_s, 1), "data_seconds": round(prep_s, 1),
        "speech_minutes": round(audio_seconds / 60, 1), "parameters": n_params, "weight_bytes": weight_bytes,
        "threads": torch.get_num_threads(), "history": history[:: max(1, len(history) // 200)],
    }
    if n_dev or n_dev_unseen:
        from stepaudio2.model.eval_asr import evaluate

        dev_utts = eval_utterances(n_dev, n_dev_unseen, seed + 7919, min_digits, max_digits)
        dev_dir = work / f"dev-{_key([CACHE_VERSION, [asdict(u) for u in dev_utts]])}"
        if not (dev_dir / "manifest.jsonl").exists():
            write_eval_set(dev_dir, dev_utts)
        res = evaluate(out_dir, dev_dir)
        seen = [r for r in res["rows"] if r["voice"] != UNSEEN_VOICE]
        unseen = [r for r in res["rows"] if r["voice"] == UNSEEN_VOICE]
        rate = lambda rs: sum(r["errors"] for r in rs) / max(1, sum(r["words"] for r in rs))  # noqa: E731
        summary["dev"] = {"wer": res["wer"], "wer_seen_voices": rate(seen), "wer_unseen_voice": rate(unseen),
                          "n": res["n"], "latency_ms": res["latency_ms"]}
        con.print(f"dev WER {100 * res['wer']:.2f}% (seen voices {100 * rate(seen):.2f}%, unseen voice "
                  f"{UNSEEN_VOICE} {100 * rate(unseen):.2f}%) over {res['n']} held-out utterances")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "train_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m stepaudio2.model.train_demo --eval-set DIR`` writes the held-out set."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-set", required=True, help="folder to write the held-out eval set into")
    p.add_argument("--n-seen", type=int, default=45)
    p.add_argument("--n-unseen", type=int, default=20)
    p.add_argument("--seed", type=int, default=20250826)
    a = p.parse_args(argv)
    out = make_eval_set(a.eval_set, a.n_seen, a.n_unseen, a.seed)
    print(f"wrote {a.n_seen + a.n_unseen} utterances to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
