"""``Token2Wav``: speech tokens -> 24 kHz audio, offline and streaming (PUBLIC_API.md).

The streaming protocol is the reference's (spec section 3.6, ``token2wav.py`` ``stream``):

* :meth:`Token2Wav.stream` pre-fills the flow caches with the prompt plus a 3-token dummy
  lookahead (``prompt_tokens + prompt_tokens[:3]``).
* ``push(tokens)`` takes 28 tokens (25 new + 3 lookahead); the caller re-sends the last 3
  at the start of the next call; the final call passes the remainder with ``last=True``.
* After each chunk the DiT attention cache is trimmed by the reference's rule
  (:meth:`FlowCache.trim`).
* The vocoder runs on the chunk's mel preceded by the previous chunk's last 8 frames; the
  first 3840 excitation samples are replaced by the previous chunk's tail; the first
  3840 output samples are cross-faded (Hamming window of 7680) with the 3840 samples
  held back from the previous call; every call but the last holds back its last 3840.
  So the first 1 s chunk yields 0.84 s of audio, later ones 1.0 s, and the last one its
  frames plus the held-back 0.16 s.

Every stream owns all its state (flow caches per Euler step, vocoder tails, its noise
buffer): streams may be interleaved freely, and :meth:`Token2Wav.push_batch` runs several
streams' chunks through one batched estimator call per Euler step and one batched vocoder
call per group of equally shaped inputs (steady-state chunks all share one shape, so no
padding changes a sample; each row keeps its own random generator). The token encoder
still runs per stream: its caches differ in length and it is ~5% of a chunk.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stepaudio2.model.token2wav.checkpoint import (FLOW_PT, HIFT_PT, fold_hift_state, hift_config_from_state,
                                                   load_flow_config, load_module_state, load_tensors, resolve_folder,
                                                   strip_generator_prefix)
from stepaudio2.model.token2wav.config import (CHUNK_TOKENS, HIFT_MEL_CACHE_FRAMES, HIFT_SOURCE_CACHE, MEL_BINS,
                                               SAMPLE_RATE)
from stepaudio2.model.token2wav.flow import Flow, FlowCache
from stepaudio2.model.token2wav.hift import HiFT
from stepaudio2.runtime.errors import InvalidArgument

TokensLike = Sequence[int] | np.ndarray | torch.Tensor


class Token2Wav:
    """Flow model + HiFT vocoder of a ``token2wav/`` folder."""

    sample_rate = SAMPLE_RATE

    def __init__(self, flow: Flow, hift: HiFT, device: str | torch.device = "cpu", folder: Path | None = None):
        self.device = torch.device(device)
        self.flow = flow.to(self.device).eval()
        self.hift = hift.to(self.device).eval()
        self.folder = folder
        self._window = torch.from_numpy(np.hamming(2 * HIFT_SOURCE_CACHE)).to(self.device)   # float64, as upstream

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Token2Wav:
        folder = resolve_folder(path)
        flow = Flow(load_flow_config(folder))
        load_module_state(flow, load_tensors(folder / FLOW_PT), FLOW_PT)
        hift_sd = strip_generator_prefix(load_tensors(folder / HIFT_PT))
        hift = HiFT(hift_config_from_state(hift_sd))
        expected = {k: v.shape for k, v in hift.state_dict().items()}
        load_module_state(hift, fold_hift_state(hift_sd, hift.cfg, expected), HIFT_PT)
        return cls(flow, hift, device, folder)

    # ----------------------------------------------------------------- properties
    @property
    def noise(self) -> torch.Tensor:
        """The default noise buffer ``[80, 30000]`` (fixed per loaded model, seeded)."""
        return self.flow.rand_noise[0]

    def reseed_noise(self, seed: int) -> None:
        """Redraw the default noise buffer from ``torch.Generator().manual_seed(seed)``."""
        self.flow.rand_noise = self.flow.make_noise(seed).to(self.device)

    @property
    def chunk_tokens(self) -> int:
        return CHUNK_TOKENS

    @property
    def lookahead_tokens(self) -> int:
        return self.flow.pre_lookahead_len

    # -------------------------------------------------------------------- inputs
    def _tokens(self, tokens: TokensLike, field: str, allow_empty: bool = False) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise InvalidArgument(f"expected a 1-D sequence of speech tokens, got shape {tuple(t.shape)}", field=field)
        if t.numel() == 0:
            if allow_empty:
                return t.to(device=self.device, dtype=torch.long).view(1, 0)
            raise InvalidArgument("needs at least one speech token", field=field)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InvalidArgument(f"speech tokens must be integers, got {t.dtype}", field=field)
        vocab = self.flow.cfg.vocab_size
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise InvalidArgument(f"speech tokens must lie in [0, {vocab}), got {lo if lo < 0 else hi}", field=field)
        return t.to(device=self.device, dtype=torch.long).view(1, -1)

    def _float(self, x, field: str) -> torch.Tensor:
        t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
        if not (t.is_floating_point()):
            t = t.float()
        t = t.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(t).all():
            raise InvalidArgument("contains NaN or infinite values", field=field)
        return t

    def _prompt(self, prompt_tokens, prompt_mel, speaker_embedding):
        pt = self._tokens(prompt_tokens, "prompt_tokens")
        mel = self._float(prompt_mel, "prompt_mel")
        if mel.dim() == 3 and mel.shape[0] == 1:
            mel = mel[0]
        want = pt.shape[1] * self.flow.up_rate
        if mel.dim() != 2 or mel.shape[1] != MEL_BINS or mel.shape[0] != want:
            raise InvalidArgument(f"expected [{want}, {MEL_BINS}] (2 frames per prompt token), got "
                                  f"{tuple(mel.shape)}", field="prompt_mel")
        spk = self._float(speaker_embedding, "speaker_embedding").reshape(-1)
        if spk.numel() != self.flow.cfg.spk_embed_dim:
            raise InvalidArgument(f"expected {self.flow.cfg.spk_embed_dim} values, got {spk.numel()}",
                                  field="speaker_embedding")
        return pt, mel.unsqueeze(0), spk.view(1, -1)

    # ------------------------------------------------------------------- offline
    @torch.inference_mode()
    def flow_offline(self, tokens: TokensLike, prompt_tokens: TokensLike, prompt_mel, speaker_embedding,
                     noise=None) -> torch.Tensor:
        """mel ``[80, 2 * len(tokens)]`` from the reference's offline ``flow.inference``:
        prompt and tokens encoded together with full attention. ``noise`` is the initial x
        ``[80, T + 2 * len(tokens)]`` (default: the start of :attr:`noise`)."""
        tok = self._tokens(tokens, "tokens")
        pt, mel, spk = self._prompt(prompt_tokens, prompt_mel, speaker_embedding)
        total = mel.shape[1] + tok.shape[1] * self.flow.up_rate
        x0 = None
        if noise is not None:
            x0 = self._float(noise, "noise")
            if x0.dim() == 3 and x0.shape[0] == 1:
                x0 = x0[0]
            if tuple(x0.shape) != (MEL_BINS, total):
                raise InvalidArgument(f"expected [{MEL_BINS}, {total}], got {tuple(x0.shape)}", field="noise")
            x0 = x0.unsqueeze(0)
        elif total > self.flow.rand_noise.shape[2]:
            raise InvalidArgument(f"prompt + tokens need {total} frames; the noise buffer has "
                                  f"{self.flow.rand_noise.shape[2]}", field="tokens")
        return self.flow.inference(tok, pt, mel, spk, x0)[0]

    @torch.inference_mode()
    def vocode(self, mel, deterministic: bool = False) -> torch.Tensor:
        """waveform ``[frames * 480]`` at 24 kHz from mel ``[80, frames]``. With
        ``deterministic`` the vocoder's random phases and noise are zero; otherwise they
        come from the global torch RNG, as in the reference."""
        m = self._float(mel, "mel")
        if m.dim() != 2 or m.shape[0] != MEL_BINS or m.shape[1] == 0:
            raise InvalidArgument(f"expected [{MEL_BINS}, frames], got {tuple(m.shape)}", field="mel")
        wav, _ = self.hift(m.unsqueeze(0), None, deterministic)
        return wav[0]

    # ----------------------------------------------------------------- streaming
    @torch.inference_mode()
    def stream(self, prompt_tokens: TokensLike, prompt_mel, speaker_embedding, noise=None, *,
               deterministic: bool = False, generator: torch.Generator | None = None) -> Token2WavStream:
        """A new stream with its caches pre-filled from the prompt. ``noise`` is the long
        buffer ``[80, N]`` every chunk reads at its current cache offset (default
        :attr:`noise`). ``deterministic``/``generator`` control the vocoder's draws."""
        return self.stream_from(self.prefill(prompt_tokens, prompt_mel, speaker_embedding, noise),
                                deterministic=deterministic, generator=generator, copy=False)

    @torch.inference_mode()
    def prefill(self, prompt_tokens: TokensLike, prompt_mel, speaker_embedding, noise=None) -> StreamPrefill:
        """The prompt's pass through the flow (the costly part of :meth:`stream`), for
        :meth:`stream_from`. It depends only on the voice and the noise buffer, so a server
        computes it once per voice and starts every stream of that voice from a copy."""
        pt, mel, spk = self._prompt(prompt_tokens, prompt_mel, speaker_embedding)
        la = self.flow.pre_lookahead_len
        if pt.shape[1] < la:
            raise InvalidArgument(f"needs at least {la} tokens (the first {la} are reused as dummy lookahead)",
                                  field="prompt_tokens")
        buf = None
        if noise is not None:
            buf = self._float(noise, "noise")
            if buf.dim() == 3 and buf.shape[0] == 1:
                buf = buf[0]
            if buf.dim() != 2 or buf.shape[0] != MEL_BINS:
                raise InvalidArgument(f"expected [{MEL_BINS}, N], got {tuple(buf.shape)}", field="noise")
            buf = buf.unsqueeze(0)
        n_buf = (self.flow.rand_noise if buf is None else buf).shape[2]
        if n_buf < mel.shape[1]:
            raise InvalidArgument(f"the noise buffer has {n_buf} frames; the prompt alone needs {mel.shape[1]}",
                                  field="noise")
        cache = self.flow.setup_cache(torch.cat([pt, pt[:, :la]], dim=1), mel, spk, buf)
        return StreamPrefill(self, spk, buf, cache)

    def stream_from(self, prefill: StreamPrefill, *, deterministic: bool = False,
                    generator: torch.Generator | None = None, copy: bool = True) -> Token2WavStream:
        """A new stream starting from ``prefill`` (copied unless ``copy=False``: then the
        prefill must not be used again). Equal to :meth:`stream` with the same prompt."""
        if prefill.t2w is not self:
            raise InvalidArgument("the prefill belongs to another Token2Wav")
        cache = prefill.cache.clone() if copy else prefill.cache
        return Token2WavStream(self, prefill.spk, prefill.noise, cache, deterministic, generator)

    @torch.inference_mode()
    def push_batch(self, streams: Sequence[Token2WavStream], chunks: Sequence[TokensLike],
                   lasts: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Advance several streams by one chunk each; the estimator runs once per Euler
        step over all of them. Same result as ``[s.push(c, l) for ...]`` up to float
        rounding (padding and masks when chunk or cache lengths differ)."""
        lasts = [False] * len(streams) if lasts is None else list(lasts)
        if not (len(streams) == len(chunks) == len(lasts)):
            raise InvalidArgument("streams, chunks and lasts must have the same length")
        if len({id(s) for s in streams}) != len(streams):
            raise InvalidArgument("a stream may appear only once per batch")
        outputs: list[torch.Tensor | None] = [None] * len(streams)
        work = []
        for i, (s, c, last) in enumerate(zip(streams, chunks, lasts)):
            if s._t2w is not self:
                raise InvalidArgument("the stream belongs to another Token2Wav")
            tok = s._check_push(c, bool(last))
            if tok.shape[1] == 0:
                outputs[i] = s._flush()
            else:
                work.append((i, s, tok, bool(last)))
        if work:
            try:
                mels, caches = self.flow.inference_chunks(
                    [w[2] for w in work], [w[1]._spk for w in work], [w[1]._cache for w in work],
                    [w[3] for w in work], [w[1]._noise for w in work])
            except ValueError as e:           # noise buffer too short
                raise InvalidArgument(str(e), field="noise") from None
            for (_, s, _, _), cache in zip(work, caches):
                cache.trim()
                s._cache = cache
            # The vocoder runs batched over streams whose inputs have the same shape (mel
            # frames incl. the 8-frame tail, source-tail length, deterministic flag): then
            # batching changes no sample (no padding); each row keeps its own generator.
            groups: dict[tuple, list[int]] = {}
            mel_in = []
            for j, ((_, s, _, _), mel) in enumerate(zip(work, mels)):
                mel_in.append(s._vocoder_input(mel))
                key = (mel_in[j].shape[2], s._source_tail.shape[2], s.deterministic)
                groups.setdefault(key, []).append(j)
            for (_, _, det), js in groups.items():
                gens = [work[j][1].generator for j in js]
                if len(js) == 1:
                    speech, source = self.hift(mel_in[js[0]], work[js[0]][1]._source_tail, det, gens[0])
                    rows = [(speech, source)]
                else:
                    speech, source = self.hift(torch.cat([mel_in[j] for j in js]),
                                               torch.cat([work[j][1]._source_tail for j in js]), det,
                                               gens if any(g is not None for g in gens) else None)
                    rows = [(speech[r:r + 1], source[r:r + 1]) for r in range(len(js))]
                for j, (sp, so) in zip(js, rows):
                    i, s, _, last = work[j]
                    outputs[i] = s._vocoder_output(mel_in[j], sp, so, last)
        return outputs  # type: ignore[return-value]


class StreamPrefill:
    """A prompt-filled flow cache (:meth:`Token2Wav.prefill`); read-only once made."""

    def __init__(self, t2w: Token2Wav, spk: torch.Tensor, noise: torch.Tensor | None, cache: FlowCache):
        self.t2w, self.spk, self.noise, self.cache = t2w, spk, noise, cache


class Token2WavStream:
    """One utterance's streaming state; create with :meth:`Token2Wav.stream`."""

    def __init__(self, t2w: Token2Wav, spk: torch.Tensor, noise: torch.Tensor | None, cache: FlowCache,
                 deterministic: bool, generator: torch.Generator | None):
        self._t2w = t2w
        self._spk = spk
        self._noise = noise
        self._cache = cache
        self.deterministic = deterministic
        self.generator = generator
        dev = t2w.device
        self._mel_tail = torch.zeros(1, MEL_BINS, 0, device=dev)
        self._source_tail = torch.zeros(1, 1, 0, device=dev)
        self._speech_tail = torch.zeros(1, 0, device=dev)
        self.finished = False
        self.chunks = 0
        self.last_mel: torch.Tensor | None = None      # [80, frames] of the latest chunk

    @property
    def cache(self) -> FlowCache:
        return self._cache

    def push(self, tokens: TokensLike, last: bool = False) -> torch.Tensor:
        """float32 samples in [-1, 1] (CPU tensor) for this chunk. ``tokens``: 28 per call
        (25 new + 3 lookahead; re-send the last 3 next time); the remainder with
        ``last=True``. An empty ``last`` push returns the held-back 0.16 s."""
        return self._t2w.push_batch([self], [tokens], [last])[0]

    def _check_push(self, tokens: TokensLike, last: bool) -> torch.Tensor:
        if self.finished:
            raise InvalidArgument("the stream is finished (its last chunk was pushed)", field="tokens")
        tok = self._t2w._tokens(tokens, "tokens", allow_empty=last)
        flow = self._t2w.flow
        least = flow.pre_lookahead_len + HIFT_MEL_CACHE_FRAMES // flow.up_rate
        if not last and tok.shape[1] < least:
            raise InvalidArgument(f"a chunk that is not the last needs at least {least} tokens (its last "
                                  f"{flow.pre_lookahead_len} are lookahead); the protocol sends "
                                  f"{CHUNK_TOKENS + flow.pre_lookahead_len}", field="tokens")
        return tok

    def _flush(self) -> torch.Tensor:
        self.finished = True
        return self._speech_tail[0].clamp(-1.0, 1.0).float().cpu()

    def _vocode(self, chunk_mel: torch.Tensor, last: bool) -> torch.Tensor:
        mel = self._vocoder_input(chunk_mel)
        speech, source = self._t2w.hift(mel, self._source_tail, self.deterministic, self.generator)
        return self._vocoder_output(mel, speech, source, last)

    def _vocoder_input(self, chunk_mel: torch.Tensor) -> torch.Tensor:
        """The vocoder's mel: the previous chunk's last 8 frames, then this chunk's."""
        self.last_mel = chunk_mel[0]
        return torch.cat([self._mel_tail, chunk_mel], dim=2)

    def _vocoder_output(self, mel: torch.Tensor, speech: torch.Tensor, source: torch.Tensor,
                        last: bool) -> torch.Tensor:
        """Cross-fade with the held-back tail, keep the new tails, hold back 0.16 s."""
        t2w = self._t2w
        n = self._speech_tail.shape[1]
        if n > 0:
            w = t2w._window
            half = w.shape[0] // 2
            speech = speech.clone()
            speech[:, :half] = speech[:, :half] * w[:half] + self._speech_tail[:, -half:] * w[half:]
        self._mel_tail = mel[:, :, -HIFT_MEL_CACHE_FRAMES:].clone()
        self._source_tail = source[:, :, -HIFT_SOURCE_CACHE:].clone()
        self._speech_tail = speech[:, -HIFT_SOURCE_CACHE:].clone()
        if not last:
            speech = speech[:, :-HIFT_SOURCE_CACHE]
        else:
            self.finished = True
        self.chunks += 1
        return speech[0].clamp(-1.0, 1.0).float().cpu()
