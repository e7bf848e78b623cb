"""`StepAudio2`: the public model API of PUBLIC_API.md, over one PyTorch module.

``StepAudio2Net`` holds the four checkpoint parts under their checkpoint prefixes
(``encoder.``, ``adapter.``, ``model.``, ``lm_head.``; spec §5.3). ``StepAudio2`` wraps
it with the tokenizer and the calls others make: ``log_mel``, ``encode_audio``,
``logits``, ``generate``, plus the step API a continuous-batching engine drives
(``new_cache``, ``prefill``, ``decode``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from stepaudio2.model.audio import encoder_input_length
from stepaudio2.model.checkpoint import load_state_dict, parse_dtype
from stepaudio2.model.config import StepAudio2Config
from stepaudio2.model.encoder import Adaptor, AudioEncoder
from stepaudio2.model.llm import KVCache, Qwen2Model
from stepaudio2.runtime.errors import CheckpointError, InvalidArgument


class StepAudio2Net(nn.Module):
    """Encoder + adapter + Qwen2 decoder + untied lm_head (spec §1.3-§1.7)."""

    def __init__(self, cfg: StepAudio2Config):
        super().__init__()
        self.encoder = AudioEncoder(cfg.audio)
        self.adapter = Adaptor(cfg.audio)
        self.model = Qwen2Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)


def expected_shapes(cfg: StepAudio2Config) -> dict[str, torch.Size]:
    """Every checkpoint tensor name -> shape for this config, computed without memory."""
    with torch.device("meta"):
        net = StepAudio2Net(cfg)
    return {k: v.shape for k, v in net.state_dict().items()}


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


class StepAudio2:
    """Step-Audio 2 in PyTorch. Build with :meth:`from_pretrained`."""

    def __init__(self, net: StepAudio2Net, config: StepAudio2Config, tokenizer, device: torch.device):
        self.net = net.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = next(net.parameters()).dtype
        self.load_seconds = 0.0

    # -- loading -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu") -> "StepAudio2":
        """Load a checkpoint folder (real layout, PUBLIC_API.md "Checkpoint folders").

        ``dtype`` None keeps the stored ``torch_dtype`` (bf16 for the real mini); then
        the weights stay memory-mapped on CPU (no second copy).
        """
        from stepaudio2.model.tokenizer import StepAudioTokenizer

        t0 = time.perf_counter()
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        cfg = StepAudio2Config.from_file(path)
        want = parse_dtype(dtype) or parse_dtype(cfg.torch_dtype)
        tokenizer = StepAudioTokenizer.from_dir(path)
        if len(tokenizer) > cfg.text.vocab_size:
            raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but text_config.vocab_size is "
                                  f"{cfg.text.vocab_size}")
        with torch.device("meta"):
            net = StepAudio2Net(cfg)
        expected = {k: v.shape for k, v in net.state_dict().items()}
        state = load_state_dict(path, expected, dtype=want)
        net.load_state_dict(state, strict=True, assign=True)
        del state
        device = torch.device(device)
        if device.type != "cpu":
            net = net.to(device)
        model = cls(net, cfg, tokenizer, device)
        model.load_seconds = time.perf_counter() - t0
        return model

    # -- audio ---------------------------------------------------------------------
    def log_mel(self, waveform_16k) -> np.ndarray:
        """[128, F] log-mel of one clip of at most 30 s (spec §1.2)."""
        from stepaudio2.model.frontend import log_mel

        return log_mel(waveform_16k).cpu().numpy()

    @torch.inference_mode()
    def encode_audio(self, mels, mel_lens) -> tuple[torch.Tensor, torch.Tensor]:
        """mels [B, 128, T] (zero right-padded), mel_lens [B] raw frame counts F.

        Returns adapter embeddings [B, N_max, llm_dim] and their lengths [B]. The F - 2
        convention of the reference is applied here (spec §1.2, §9.2).
        """
        mels = _as_tensor(mels).to(self.device, self.dtype)
        lens = _as_tensor(mel_lens).long().reshape(-1)
        if mels.dim() != 3 or mels.shape[1] != self.config.audio.n_mels or mels.shape[0] != lens.shape[0]:
            raise InvalidArgument(f"mels must be [B, {self.config.audio.n_mels}, T] with B == len(mel_lens), got "
                                  f"{list(mels.shape)} and {list(lens.shape)}", field="mels")
        max_frames = 2 * self.config.audio.n_audio_ctx  # 1500 positions at 50 fps = 3000 mel frames (spec §1.3)
        if mels.shape[-1] > max_frames:
            raise InvalidArgument(f"mels have {mels.shape[-1]} frames; the encoder takes at most {max_frames} "
                                  f"(30 s): cut long audio into 25 s chunks first", field="mels")
        if int(lens.min()) < 3 or int(lens.max()) > mels.shape[-1]:
            raise InvalidArgument(f"mel_lens must be in [3, T={mels.shape[-1]}], got {lens.tolist()}",
                                  field="mel_lens")
        enc_in = torch.tensor([encoder_input_length(int(n)) for n in lens])
        x, enc_lens = self.net.encoder(mels, enc_in)
        x = self.net.adapter(x)
        out_lens = (enc_lens - 1) // 2 + 1  # spec §1.4
        return x, out_lens

    def encode_chunks(self, chunks: Sequence) -> list[torch.Tensor]:
        """16 kHz waveforms (each <= 30 s) -> one [N_i, llm_dim] array per chunk, batched."""
        from stepaudio2.model.frontend import log_mel

        if not chunks:
            return []
        mels = [log_mel(c) for c in chunks]
        frames = torch.tensor([m.shape[1] for m in mels])
        batch = torch.zeros(len(mels), mels[0].shape[0], int(frames.max()))
        for i, m in enumerate(mels):
            batch[i, :, : m.shape[1]] = m
        emb, lens = self.encode_audio(batch, frames)
        return [emb[i, : int(n)] for i, n in enumerate(lens)]

    # -- text side -----------------------------------------------------------------
    def embed(self, input_ids, audio_embeds: Sequence = ()) -> torch.Tensor:
        """Token embeddings [L, D] with the i-th audio array written over the i-th run
        of `<audio_patch>` ids (spec §1.6)."""
        ids = _as_tensor(input_ids).long().reshape(-1).to(self.device)
        vocab = self.config.text.vocab_size
        if ids.numel() == 0:
            raise InvalidArgument("input_ids is empty", field="input_ids")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InvalidArgument(f"input_ids contain ids outside [0, {vocab})", field="input_ids")
        with torch.inference_mode():
            x = self.net.model.embed_tokens(ids)
        runs = patch_runs(ids.tolist(), self.tokenizer.special.audio_patch)
        audio_embeds = list(audio_embeds)
        if len(runs) != len(audio_embeds):
            raise InvalidArgument(f"prompt has {len(runs)} <audio_patch> runs but {len(audio_embeds)} audio "
                                  f"arrays were given", field="audio_embeds")
        if runs:
            x = x.clone()
            for i, ((start, n), a) in enumerate(zip(runs, audio_embeds)):
                a = _as_tensor(a).to(self.device, x.dtype)
                if a.dim() != 2 or a.shape[0] != n or a.shape[1] != x.shape[1]:
                    raise InvalidArgument(f"audio array {i} has shape {list(a.shape)} but its <audio_patch> run "
                                          f"has {n} positions of width {x.shape[1]}", field="audio_embeds")
                x[start:start + n] = a
        return x

    def new_cache(self, num_slots: int, capacity: int = 256, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.text, num_slots, dtype=self.dtype, device=self.device,
                       capacity=capacity, max_len=max_len)

    @torch.inference_mode()
    def forward_embeds(self, cache: KVCache, slots: list[int], embeds: Sequence[torch.Tensor],
                       all_logits: bool = False) -> torch.Tensor:
        """Append each ``embeds[i]`` [n_i, D] to ``slots[i]``; return the logits of each
        row's last new token [B, vocab] (or of every new token [B, n_max, vocab])."""
        lens = [int(e.shape[0]) for e in embeds]
        n_max = max(lens)
        d = self.config.text.hidden_size
        x = torch.zeros(len(embeds), n_max, d, dtype=self.dtype, device=self.device)
        for i, e in enumerate(embeds):
            x[i, : lens[i]] = e
        h = self.net.model(x, lens, cache, list(slots))
        if all_logits:
            return self.net.lm_head(h)
        last = h[torch.arange(len(lens)), torch.tensor(lens) - 1]
        return self.net.lm_head(last)

    def prefill(self, cache: KVCache, slots: list[int], prompts: Sequence, audio_embeds: Sequence | None = None
                ) -> torch.Tensor:
        """Prompts (1-D ids each, with their audio arrays) -> next-token logits [B, vocab]."""
        audio_embeds = audio_embeds or [()] * len(prompts)
        return self.forward_embeds(cache, slots, [self.embed(p, a) for p, a in zip(prompts, audio_embeds)])

    def decode(self, cache: KVCache, slots: list[int], token_ids: Sequence[int]) -> torch.Tensor:
        """One decode step for a batch: each slot gets its next token -> logits [B, vocab]."""
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            e = self.net.model.embed_tokens(ids)[:, None, :]
        return self.forward_embeds(cache, slots, list(e))

    @torch.inference_mode()
    def logits(self, input_ids, audio_embeds: Sequence = ()) -> torch.Tensor:
        """Full-sequence logits [L, vocab] of one prompt (PUBLIC_API.md)."""
        x = self.embed(input_ids, audio_embeds)
        cache = self.new_cache(1, capacity=x.shape[0], max_len=max(x.shape[0], self.config.text.max_position_embeddings))
        return self.forward_embeds(cache, [0], [x], all_logits=True)[0]

    def generate(self, input_ids, audio_embeds: Sequence = (), max_new_tokens: int = 2048,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_ids: Sequence[int] | None = None, **extra) -> list[int]:
        """Generated ids without the final stop token (as the reference returns them).

        Extra keywords are :class:`SamplingParams` fields (``min_tokens``, ``logit_bias``,
        ``allowed_token_ids``).
        """
        from stepaudio2.model.generation import BatchGenerator
        from stepaudio2.model.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed,
                                stop_ids=list(stop_ids) if stop_ids is not None else None, **extra)
        gen = BatchGenerator(self, max_batch=1)
        gen.add("0", input_ids, audio_embeds, params)
        return gen.run_to_completion()["0"].output_ids


def patch_runs(ids: list[int], patch_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``patch_id`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == patch_id:
            j = i
            while j < n and ids[j] == patch_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def load_for_serving(model_dir: str | Path, dtype: str = "auto", device: str = "cpu",
                     num_threads: int | None = None) -> StepAudio2:
    """What every serving process does at start: set torch's intra-op threads (one
    per model instance on small CPU nodes), then load the checkpoint (``dtype`` "auto"
    keeps the stored one)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    return StepAudio2.from_pretrained(model_dir, dtype=None if dtype == "auto" else dtype, device=device)
