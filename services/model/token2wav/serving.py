"""Serving many token2wav streams at once: the object the Triton ``token2wav`` model calls.

A *stream* is one utterance being detokenized chunk by chunk (spec §3.6). Each chunk
request names its stream (Triton's correlation id), and carries flags:

* ``start``: open the stream: resolve ``voice`` through the voice library (a bounded
  LRU of decoded voices in front of S3 or a folder), pre-fill the flow caches with the
  voice's prompt, seed the vocoder's random draws (``seed``, or a random one);
* ``end``: this is the last chunk (the remainder, possibly empty): flush and free;
* ``cancel``: drop the stream now; no audio. With ``start`` and ``voice`` it only warms
  that voice's prompt prefill (e.g. right after the voice is registered).

Chunks of different streams that arrive together run as ONE batch
(:meth:`Token2Wav.push_batch`: one estimator call per Euler step for all of them). A bad
chunk fails alone (its stream is dropped: the caller aborts it anyway) and never affects
the other streams of the batch.

State lives in a :class:`~stepaudio2.runtime.state_table.StateTable`: at most
``max_streams`` streams, each freed on its last chunk, on cancel, on error, or after
``idle_timeout_s`` without a chunk. It is never an unbounded dict.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np
import torch

from stepaudio2.model.token2wav.api import StreamPrefill, Token2Wav, Token2WavStream
from stepaudio2.runtime.errors import FailedPrecondition, InvalidArgument, StepAudio2Error
from stepaudio2.runtime.triton_params import ChunkRequest  # noqa: F401 - re-exported: the request type of execute()
from stepaudio2.runtime.state_table import StateTable, TableStats
from stepaudio2.runtime.voice_store import Voice, VoiceStore, check_voice_id

_LOGGER = logging.getLogger(__name__)
EMPTY = np.zeros(0, dtype=np.float32)


class Token2WavService:
    """Streams of one :class:`Token2Wav`, their voices and their bounded state."""

    def __init__(self, t2w: Token2Wav, voices: VoiceStore, *, max_streams: int = 64, idle_timeout_s: float = 60.0,
                 prompt_cache_items: int = 8, clock=None):
        self.t2w = t2w
        self.voices = voices
        self.table: StateTable[Token2WavStream] = StateTable(max_streams, idle_timeout_s,
                                                             clock=clock or time.monotonic, on_drop=self._log_drop)
        # Prompt-filled flow caches per voice (see _prefill), bounded LRU.
        self._prompt_cache: OrderedDict[str, tuple[Voice, StreamPrefill]] = OrderedDict()
        self._prompt_cache_items = max(0, int(prompt_cache_items))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------- state
    @property
    def live_streams(self) -> int:
        return len(self.table)

    def stats(self) -> TableStats:
        return self.table.snapshot()

    def expire_idle(self) -> list[Hashable]:
        return self.table.expire()

    def close(self) -> None:
        self.table.clear()

    @staticmethod
    def _log_drop(key, stream, why) -> None:
        if why == "expired":
            _LOGGER.info("token2wav stream %s expired after the idle timeout (%d chunks done)", key, stream.chunks)

    # ------------------------------------------------------------------ voices
    def _prefill(self, voice_id: str) -> tuple[StreamPrefill, bool]:
        """The voice's prompt-filled flow cache, and whether it may be shared (cached).

        The prompt pass depends only on the voice (and the fixed noise buffer), so it runs
        once per voice; each stream starts from a copy. Bounded LRU of
        ``prompt_cache_items`` voices (real size: ~0.4 GB each with a 3 s prompt in fp32)."""
        voice = self.voices.get(voice_id)           # NotFound for an unknown voice
        with self._lock:
            hit = self._prompt_cache.get(voice_id)
            if hit is not None and hit[0] is voice:   # same decoded voice object: still current
                self._prompt_cache.move_to_end(voice_id)
                return hit[1], True
        dev = self.t2w.device
        prefill = self.t2w.prefill(torch.from_numpy(voice.prompt_tokens.astype(np.int64)).to(dev),
                                   torch.from_numpy(voice.prompt_mel).to(dev),
                                   torch.from_numpy(voice.speaker_embedding).to(dev))
        if not self._prompt_cache_items:
            return prefill, False
        with self._lock:
            self._prompt_cache[voice_id] = (voice, prefill)
            self._prompt_cache.move_to_end(voice_id)
            while len(self._prompt_cache) > self._prompt_cache_items:
                self._prompt_cache.popitem(last=False)
        return prefill, True

    def warm(self, voice_ids) -> list[str]:
        """Compute the prompt prefill of these voices now (e.g. the built-ins at start-up), so
        their first streams do not stall a batch with the prompt pass. Returns the ids warmed;
        unknown or broken voices are skipped (logged)."""
        done = []
        for vid in list(voice_ids)[: self._prompt_cache_items]:
            try:
                self._prefill(check_voice_id(vid))
                done.append(vid)
            except Exception as e:  # noqa: BLE001 - warming is an optimisation
                _LOGGER.warning("token2wav: could not warm voice %r: %s", vid, e)
        return done

    def _open(self, r: ChunkRequest) -> Token2WavStream:
        if not r.voice:
            raise InvalidArgument("the first chunk of a stream must name its voice", field="voice")
        prefill, shared = self._prefill(check_voice_id(r.voice))
        seed = secrets.randbits(63) if r.seed is None else int(r.seed)
        gen = torch.Generator(device=self.t2w.device).manual_seed(seed)
        return self.t2w.stream_from(prefill, generator=gen, copy=shared)

    # ----------------------------------------------------------------- execute
    def execute(self, requests: Sequence[ChunkRequest]) -> list[np.ndarray | StepAudio2Error | Exception]:
        """One result per request, in order: float32 samples in [-1, 1] at 24 kHz, or the
        exception that failed that request alone."""
        results: list = [None] * len(requests)
        work: list[tuple[int, Hashable, Token2WavStream, torch.Tensor, bool]] = []
        seen: set = set()
        for i, r in enumerate(requests):
            key = r.stream_id
            try:
                if key in seen:
                    raise InvalidArgument(f"stream {key} has two chunks in one batch; send them in order",
                                          field="stream_id")
                seen.add(key)
                if r.cancel:
                    self.table.pop(key, "cancelled")
                    if r.start and r.voice:     # START + CANCEL: warm this voice's prefill, keep no stream
                        self._prefill(check_voice_id(r.voice))
                    results[i] = EMPTY
                    continue
                if r.start:
                    stream = self._open(r)
                    self.table.add(key, stream)
                else:
                    stream = self.table.get(key)
                    if stream is None:
                        raise FailedPrecondition(f"stream {key} is not open: it ended, was cancelled, expired "
                                                 f"after {self.table.idle_timeout_s:g} s idle, or never started",
                                                 field="stream_id")
                tokens = np.asarray(r.tokens).reshape(-1)
                if r.start and tokens.size == 0 and not r.end:
                    results[i] = EMPTY                  # opened; tokens follow
                    continue
                tok = stream._check_push(tokens, bool(r.end))
                if tok.shape[1] == 0:                   # an empty last chunk: the held-back tail
                    results[i] = stream._flush().numpy().astype(np.float32, copy=False)
                    self.table.pop(key, "finished")
                    continue
                work.append((i, key, stream, tok, bool(r.end)))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                results[i] = e
                self.table.pop(key, "cancelled")
        if work:
            self._run(work, results)
        return results

    def _run(self, work, results) -> None:
        # A stream whose cache object or length changed has advanced (the flow step moves
        # every batched cache forward before the per-stream vocoder runs).
        before = [(w[2].cache, w[2].cache.offset) for w in work]
        try:
            outs = self.t2w.push_batch([w[2] for w in work], [w[3] for w in work], [w[4] for w in work])
        except Exception as e:  # noqa: BLE001 - isolate: run each untouched stream alone
            if len(work) == 1:
                outs = [e]
            else:
                _LOGGER.warning("batched token2wav step failed (%r); running %d streams one by one", e, len(work))
                outs = []
                for (_, key, stream, tok, last), (cache, offset) in zip(work, before):
                    if stream.cache is not cache or cache.offset != offset:   # advanced, output lost: no redo
                        outs.append(e)
                        continue
                    try:
                        outs.append(self.t2w.push_batch([stream], [tok], [last])[0])
                    except Exception as e1:  # noqa: BLE001
                        outs.append(e1)
        for (i, key, _, _, last), out in zip(work, outs):
            if isinstance(out, Exception):
                results[i] = out
                self.table.pop(key, "cancelled")
                continue
            results[i] = out.numpy().astype(np.float32, copy=False)
            if last:
                self.table.pop(key, "finished")
