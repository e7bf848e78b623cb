"""Tokens -> 50 Hz mel: the reference's ``CausalMaskedDiffWithXvec`` + ``CausalConditionalCFM``.

speaker embedding (192) -> L2-normalise -> ``spk_embed_affine_layer`` (-> 80);
tokens -> ``input_embedding`` -> encoder (x2 upsampling) -> ``encoder_proj`` = mu (80);
then 10 Euler steps of the DiT estimator from noise x0 over the cosine schedule
``t = 1 - cos(linspace(0, 1, 11) * pi/2)``, with classifier-free guidance on a doubled
batch (conditional row: mu, speaker, cond; unconditional row: all three zero):
``v = 1.7 v_cond - 0.7 v_uncond``.

Offline (:meth:`Flow.inference`): prompt and generated tokens are encoded together with
full attention; ``cond`` is the prompt mel for the prompt frames and zero after; the
generated frames are returned.

Streaming (:meth:`Flow.setup_cache`, :meth:`Flow.inference_chunk`): the prompt (plus 3
dummy lookahead tokens) pre-fills the caches; each chunk runs the encoder and the solver
with caches and ``cond`` = 0. Every Euler step has its own DiT caches. Noise is read from
a long buffer at the current DiT cache length, as the reference does. All state lives in
:class:`FlowCache` objects the caller owns: nothing is kept on the module, so any number
of streams can share one model (the reference keeps scratch buffers on the module).

Noise: by default one ``randn(1, 80, 30000)`` buffer drawn once from a seeded
``torch.Generator`` (the reference draws the same shape once per process, unseeded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.model.token2wav.config import (DIT_CACHE_TAIL_FRAMES, N_TIMESTEPS, NOISE_FRAMES, FlowConfig)
from stepaudio2.model.token2wav.dit import DiT
from stepaudio2.model.token2wav.encoder import EncoderCache, UpsampleEncoder


def cosine_t_span(n_timesteps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi)


def euler_times(n_timesteps: int, device=None, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t, dt) per step, accumulated in ``dtype`` exactly as the reference's solver does
    (t += dt; dt = t_span[step+1] - t)."""
    span = cosine_t_span(n_timesteps, device, dtype)
    t, dt = span[0].unsqueeze(0), span[1] - span[0]
    out = []
    for step in range(1, len(span)):
        out.append((t, dt))
        t = t + dt
        if step < len(span) - 1:
            dt = span[step + 1] - t
    return out


class FlowCache:
    """One stream's flow state.

    ``dit_att`` (materialised on access): ``[steps, depth, 2, H, T, 2*hd]`` K/V per Euler
    step, rows (cond, uncond), newest chunk first along T; ``dit_cnn``:
    ``[steps, depth, 2, 2*hidden, 2]``; ``prompt_frames``: the prompt mel length (for the
    trim rule).

    Storage: the keys and values live in two preallocated buffers
    ``[steps, depth, 2, H, capacity, hd]``, right-aligned: the cache is ``[start:]``. A
    chunk writes its new keys just left of ``start`` and the estimator attends over the
    view ``[start - t:]``, which holds exactly the keys (in the same order) that the
    reference's ``torch.cat([k, k_cache])`` builds: the arithmetic is unchanged, but the
    cache is not copied per block and step, nor re-stacked, and :meth:`trim` moves only
    the kept head instead of copying the whole cache (the reference's ~0.5 GB per chunk)."""

    SLACK = 64          # spare frames allocated left of the cache (one standard chunk = 50)

    def __init__(self, encoder: EncoderCache, dit_att: torch.Tensor | None, dit_cnn: torch.Tensor,
                 prompt_frames: int, *, _kv: tuple[torch.Tensor, torch.Tensor, int] | None = None):
        self.encoder = encoder
        self.dit_cnn = dit_cnn
        self.prompt_frames = prompt_frames
        if _kv is not None:
            self._k, self._v, self._start = _kv
        else:                                   # from the packed layout
            k, v = dit_att.chunk(2, dim=-1)
            self._k, self._v, self._start = self._alloc(k.shape, k.shape[4] + self.SLACK, k.dtype, k.device)
            self._k[..., self._start - k.shape[4]:, :] = k
            self._v[..., self._start - k.shape[4]:, :] = v
            self._start -= k.shape[4]

    @staticmethod
    def _alloc(shape, capacity: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        full = (*shape[:4], capacity, shape[5])
        return torch.empty(full, dtype=dtype, device=device), torch.empty(full, dtype=dtype, device=device), capacity

    @classmethod
    def empty(cls, encoder, dit_cnn, prompt_frames: int, steps: int, depth: int, heads: int, head_dim: int,
              capacity: int, dtype=torch.float32, device=None) -> FlowCache:
        kv = cls._alloc((steps, depth, 2, heads, 0, head_dim), capacity, dtype, device)
        return cls(encoder, None, dit_cnn, prompt_frames, _kv=kv)

    def clone(self) -> FlowCache:
        """An independent copy: a stream started from a shared prompt prefill owns its K/V
        buffers (written in place); the encoder and conv caches are never written in place
        (each chunk makes new tensors), so they are shared."""
        return FlowCache(self.encoder, None, self.dit_cnn, self.prompt_frames,
                         _kv=(self._k.clone(), self._v.clone(), self._start))

    @property
    def capacity(self) -> int:
        return self._k.shape[4]

    @property
    def offset(self) -> int:
        """Frames in the DiT attention cache = where the next chunk reads the noise."""
        return self.capacity - self._start

    @property
    def dit_att(self) -> torch.Tensor:
        return torch.cat([self._k[..., self._start:, :], self._v[..., self._start:, :]], dim=-1)

    def kv_views(self, step: int, new: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per block, the K and V views ``[2, H, new + offset, hd]`` whose first ``new``
        frames the next chunk fills (call :meth:`reserve` first)."""
        lo = self._start - new
        return ([k[:, :, lo:] for k in self._k[step]], [v[:, :, lo:] for v in self._v[step]])

    def reserve(self, new: int) -> None:
        """Make room for ``new`` frames left of the cache (reallocates if needed)."""
        if self._start >= new:
            return
        n = self.offset
        k, v, cap = self._alloc(self._k.shape, n + new + self.SLACK, self._k.dtype, self._k.device)
        k[..., cap - n:, :] = self._k[..., self._start:, :]
        v[..., cap - n:, :] = self._v[..., self._start:, :]
        self._k, self._v, self._start = k, v, cap - n

    def advance(self, new: int) -> None:
        """The ``new`` frames left of the cache were written: they join it (newest first)."""
        self._start -= new

    def trim(self, keep_tail: int = DIT_CACHE_TAIL_FRAMES) -> None:
        """The reference's rule after each chunk (``token2wav.py`` ``stream``): once the DiT
        cache is longer than prompt + ``keep_tail``, keep its first ``prompt_frames`` and
        last ``keep_tail`` entries. Because the newest frames come first, this keeps the
        most recent ``prompt_frames`` generated frames and the last ``keep_tail`` prompt
        frames (not "the prompt plus the last 100 frames" its comment suggests).

        In place: the kept tail already sits at the right end; the head moves right by
        the dropped length (in blocks no longer than the shift, right to left, so no
        block overwrites frames still to be read)."""
        p, n, s = self.prompt_frames, self.offset, self._start
        if n <= p + keep_tail:
            return
        d = n - p - keep_tail
        for buf in (self._k, self._v):
            if p == 0:
                pass
            elif d * 8 < p:                    # many tiny blocks: one temporary copy instead
                buf[..., s + d:s + d + p, :] = buf[..., s:s + p, :].clone()
            else:
                hi = s + p
                while hi > s:
                    lo = max(s, hi - d)
                    buf[..., lo + d:hi + d, :] = buf[..., lo:hi, :]
                    hi = lo
        self._start = s + d


class CFMDecoder(nn.Module):
    """Holds the estimator (state-dict prefix ``decoder.estimator``) and the CFG rate."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.estimator = DiT(cfg.estimator)
        self.inference_cfg_rate = cfg.inference_cfg_rate

    def _guide(self, v: torch.Tensor, n: int) -> torch.Tensor:
        v_cond, v_uncond = v[:n], v[n:]
        return (1.0 + self.inference_cfg_rate) * v_cond - self.inference_cfg_rate * v_uncond

    def solve(self, x, mu, spks, cond, n_timesteps: int = N_TIMESTEPS, mask=None):
        """Offline solver over whole sequences ``[B, 80, T]`` (batch doubled for CFG)."""
        b = x.shape[0]
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        mask_in = None if mask is None else torch.cat([mask, mask])
        for s, (t, dt) in enumerate(euler_times(n_timesteps, x.device, x.dtype)):
            v = self.estimator.forward_cached(torch.cat([x, x]), mu_in, t.expand(2 * b), spks_in, cond_in, mask_in,
                                              mod_key=("offline", n_timesteps, s))
            x = x + dt * self._guide(v, b)
        return x

    def solve_chunk_into(self, x, mu, spks, cond, k_slots, v_slots, cnn: list | None,
                         n_timesteps: int = N_TIMESTEPS, lengths=None, new_lens=None):
        """Streaming solver for B sequences ``[B, 80, t]`` (estimator rows: seq0 cond, seq0
        uncond, seq1 cond, ...) with caller-owned K/V buffers: ``k_slots[s][i]`` and
        ``v_slots[s][i]`` ``[2B, H, t+T, hd]`` are step s, block i's views (first t frames
        written here, the cache after them), or per-stream lists of views with
        ``new_lens``; ``cnn[s]`` step s's conv caches or None. Returns x and the new conv
        caches."""
        b = x.shape[0]
        mu_in = _interleave(mu, torch.zeros_like(mu))
        spks_in = _interleave(spks, torch.zeros_like(spks))
        cond_in = _interleave(cond, torch.zeros_like(cond))
        g = self.inference_cfg_rate
        new_cnn = []
        for s, (t, dt) in enumerate(euler_times(n_timesteps, x.device, x.dtype)):
            v, c = self.estimator.forward_chunk_into(
                x.repeat_interleave(2, dim=0), mu_in, t.expand(2 * b), spks_in, cond_in, k_slots[s], v_slots[s],
                None if cnn is None else cnn[s], lengths, mod_key=("chunk", n_timesteps, s), new_lens=new_lens)
            v = v.view(b, 2, *v.shape[1:])
            x = x + dt * ((1.0 + g) * v[:, 0] - g * v[:, 1])
            new_cnn.append(c)
        return x, new_cnn


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rows a0, b0, a1, b1, ..."""
    return torch.stack([a, b], dim=1).reshape(-1, *a.shape[1:])


class Flow(nn.Module):
    def __init__(self, cfg: FlowConfig, noise_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CFMDecoder(cfg)
        self.register_buffer("rand_noise", self.make_noise(noise_seed), persistent=False)

    def make_noise(self, seed: int, frames: int = NOISE_FRAMES) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(1, self.cfg.output_size, frames, generator=g)

    @property
    def pre_lookahead_len(self) -> int:
        return self.cfg.encoder.pre_lookahead_len

    @property
    def up_rate(self) -> int:
        return self.cfg.encoder.up_stride

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    # ------------------------------------------------------------------ offline
    def inference(self, tokens, prompt_tokens, prompt_mel, embedding, noise=None, n_timesteps: int = N_TIMESTEPS,
                  encoder_mask=None, dit_mask=None):
        """tokens ``[1, N]``, prompt_tokens ``[1, P]``, prompt_mel ``[1, T, 80]``,
        embedding ``[1, 192]``, noise ``[1, 80, >= T + 2N]`` -> mel ``[1, 80, 2N]``.
        The masks (bool, True = attend; token frames for the encoder, mel frames for the
        DiT) are None in the reference's offline path."""
        spks = self.speaker(embedding)
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        h = self.encoder_proj(self.encoder(self.input_embedding(torch.clamp(all_tokens, min=0)), encoder_mask))
        t_prompt = prompt_mel.shape[1]
        cond = torch.zeros_like(h)
        cond[:, :t_prompt] = prompt_mel
        if noise is None:
            noise = self.rand_noise
        x0 = noise[:, :, :h.shape[1]]
        feat = self.decoder.solve(x0, h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2).contiguous(),
                                  n_timesteps, dit_mask)
        return feat[:, :, t_prompt:]

    # ---------------------------------------------------------------- streaming
    def setup_cache(self, tokens, mel, embedding, noise=None, n_timesteps: int = N_TIMESTEPS) -> FlowCache:
        """tokens ``[1, P + 3]`` (prompt tokens followed by 3 lookahead tokens), mel
        ``[1, 2P, 80]``, embedding ``[1, 192]`` -> the prompt-filled cache."""
        if (tokens.shape[1] - self.pre_lookahead_len) * self.up_rate != mel.shape[1]:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens (lookahead included) does not match "
                             f"{mel.shape[1]} mel frames")
        out, _ = self._chunk([self.input_embedding(tokens)], [self.speaker(embedding)],
                             [mel.transpose(1, 2).contiguous()], [None], [False], [noise], n_timesteps)
        return out[0]

    def inference_chunk(self, tokens, embedding, cache: FlowCache, last: bool, noise=None,
                        n_timesteps: int = N_TIMESTEPS) -> tuple[torch.Tensor, FlowCache]:
        """tokens ``[1, t]`` (lookahead included unless ``last``) -> mel ``[1, 80, 2(t-3)]``
        (``2t`` when ``last``) and the new cache (untrimmed; see :meth:`FlowCache.trim`)."""
        mels, caches = self.inference_chunks([tokens], [embedding], [cache], [last], [noise], n_timesteps)
        return mels[0], caches[0]

    def inference_chunks(self, tokens: list, embeddings: list, caches: list[FlowCache], lasts: list[bool],
                         noises: list, n_timesteps: int = N_TIMESTEPS) -> tuple[list[torch.Tensor], list[FlowCache]]:
        """Several streams' chunks at once: the encoder runs per stream, the 10 estimator
        calls run batched over all streams (padded, with key masks, when their chunk or
        cache lengths differ)."""
        embs = [self.input_embedding(t) for t in tokens]
        spks = [self.speaker(e) for e in embeddings]
        out, mels = self._chunk(embs, spks, None, caches, lasts, noises, n_timesteps)
        return mels, out

    def _chunk(self, embs, spks, conds, caches, lasts, noises, n_timesteps: int = N_TIMESTEPS):
        n = len(embs)
        mus, encs = [], []
        for i in range(n):
            h, ec = self.encoder.forward_chunk(embs[i], lasts[i], None if caches[i] is None else caches[i].encoder)
            mus.append(self.encoder_proj(h).transpose(1, 2).contiguous())        # [1, 80, t_i]
            encs.append(ec)
        lens = [m.shape[2] for m in mus]
        offsets = [0 if c is None else c.offset for c in caches]
        t_max = max(lens)
        x0s = []
        for i in range(n):
            buf = self.rand_noise if noises[i] is None else noises[i]
            x0 = buf[:, :, offsets[i]:offsets[i] + lens[i]]
            if x0.shape[2] != lens[i]:
                raise ValueError(f"the noise buffer has {buf.shape[2]} frames; this chunk needs "
                                 f"{offsets[i] + lens[i]}")
            x0s.append(x0)
        pad = lambda t: F.pad(t, (0, t_max - t.shape[-1]))           # noqa: E731
        x = torch.cat([pad(t) for t in x0s])
        mu = torch.cat([pad(t) for t in mus])
        cond = torch.zeros_like(mu) if conds is None else torch.cat([pad(c) for c in conds])
        spk = torch.cat(spks)
        # Chunks of unequal length are right-padded: the conv caches then take each
        # stream's last real frames (lengths). Attention needs no mask: every stream's rows
        # attend to exactly its own keys (Attention.forward_chunk_into with per-stream views).
        lengths = None
        if n > 1 and len(set(lens)) > 1:
            lengths = torch.tensor(lens, device=x.device).repeat_interleave(2)
        if any(c is None for c in caches) and not all(c is None for c in caches):
            raise ValueError("cannot batch a fresh stream with streams that have caches")
        est = self.decoder.estimator.cfg
        if caches[0] is None:
            caches = [FlowCache.empty(None, None, lens[i], n_timesteps, est.depth, est.num_heads, est.head_dim,
                                      lens[i] + DIT_CACHE_TAIL_FRAMES + FlowCache.SLACK, x.dtype, x.device)
                      for i in range(n)]
            cnn_in = None
        elif n == 1:
            cnn_in = list(caches[0].dit_cnn)
        else:
            cnn_in = [torch.cat([c.dit_cnn[s] for c in caches], dim=1) for s in range(n_timesteps)]
        for i in range(n):
            caches[i].reserve(lens[i])
        if n == 1:
            views = [caches[0].kv_views(s, lens[0]) for s in range(n_timesteps)]
            k_slots, v_slots = [v[0] for v in views], [v[1] for v in views]
            new_lens = None
        else:
            # several streams: per step and block, a LIST of each stream's own K/V views
            # (written in place; nothing is copied or padded)
            views = [[c.kv_views(s, lens[i]) for i, c in enumerate(caches)] for s in range(n_timesteps)]
            k_slots = [[[vw[0][blk] for vw in views[s]] for blk in range(est.depth)] for s in range(n_timesteps)]
            v_slots = [[[vw[1][blk] for vw in views[s]] for blk in range(est.depth)] for s in range(n_timesteps)]
            new_lens = lens
        x, new_cnn = self.decoder.solve_chunk_into(x, mu, spk, cond, k_slots, v_slots, cnn_in, n_timesteps,
                                                   lengths, new_lens)
        out, mels = [], []
        for i in range(n):
            c = caches[i]
            c.advance(lens[i])
            cnn = torch.stack([st[:, 2 * i:2 * i + 2] for st in new_cnn])
            out.append(FlowCache(encs[i], None, cnn, c.prompt_frames, _kv=(c._k, c._v, c._start)))
            mels.append(x[i:i + 1, :, :lens[i]])
        return out, mels
