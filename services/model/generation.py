"""Incremental batched generation over the KV cache.

:class:`BatchGenerator` keeps one running batch. ``add`` queues a request; each
``step`` (1) admits queued requests into free cache slots, (2) prefills admitted
prompts - at most ``prefill_budget`` prompt tokens per step, so a long newcomer is
prefilled in chunks over several steps and never stalls the running streams for more
than one step's worth of work - sampling a sequence's first token when its prompt is
complete, then (3) runs ONE decode step for every sequence that was already decoding.
Finished (stop id or max tokens) and cancelled sequences leave the batch and free their
slot at once, so others join at the next step. The Triton ``llm`` model drives this
object from the engine's scheduler thread (``stepaudio2.model.engine``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from stepaudio2.model.sampling import Sampler, SamplingParams
from stepaudio2.runtime.errors import InvalidArgument, ResourceExhausted


@dataclass
class SequenceState:
    request_id: str
    slot: int
    sampler: Sampler
    params: SamplingParams
    prompt_len: int
    embeds: torch.Tensor | None = None  # prompt embeddings until fully prefilled
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    next_input: int | None = None      # the last sampled id, fed at the next decode step


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None               # None when the step only reports the finish
    finished: bool
    finish_reason: str | None


@dataclass
class _Pending:
    request_id: str
    input_ids: list[int]
    embeds: torch.Tensor               # prompt embeddings, audio spliced in (checked at add)
    params: SamplingParams


class BatchGenerator:
    def __init__(self, model, max_batch: int, capacity: int = 256, max_len: int | None = None,
                 keep_finished: bool = True, prefill_budget: int | None = None):
        self.model = model
        self.keep_finished = keep_finished  # an engine reads StepOutputs and keeps nothing
        self.prefill_budget = prefill_budget
        self.cache = model.new_cache(max_batch, capacity=capacity, max_len=max_len)
        self.running: dict[str, SequenceState] = {}
        self.pending: list[_Pending] = []
        self.finished: dict[str, SequenceState] = {}

    # -- requests ------------------------------------------------------------------
    def add(self, request_id: str, input_ids, audio_embeds: Sequence = (), params: SamplingParams | None = None,
            embeds: torch.Tensor | None = None):
        """Queue a request. ``embeds`` may carry the prompt's embeddings already made by
        :meth:`prepare` (e.g. in another thread); else they are made here."""
        if embeds is None:
            ids, embeds, params = self.prepare(input_ids, audio_embeds, params)
        else:
            ids = [int(i) for i in input_ids]
        if request_id in self.running or any(p.request_id == request_id for p in self.pending):
            raise InvalidArgument(f"request id {request_id!r} is already active", field="request_id")
        self.pending.append(_Pending(request_id, ids, embeds, params))

    def prepare(self, input_ids, audio_embeds: Sequence = (), params: SamplingParams | None = None
                ) -> tuple[list[int], torch.Tensor, SamplingParams]:
        """Validate a request and embed its prompt (audio spliced in). Thread-safe; a
        bad request fails here, for its caller alone, never inside a batched step."""
        params = (params or SamplingParams()).validate(self.model.config.text.vocab_size)
        ids = [int(i) for i in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
        if len(ids) + params.max_new_tokens > self.cache.max_len:
            raise InvalidArgument(f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                                  f"the context limit of {self.cache.max_len}", field="max_new_tokens")
        return ids, self.model.embed(ids, audio_embeds), params

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its slot. True when it was active."""
        for i, p in enumerate(self.pending):
            if p.request_id == request_id:
                del self.pending[i]
                return True
        seq = self.running.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "cancelled")
        return True

    def abort_all(self, reason: str = "error") -> list[str]:
        """Finish every running and queued request (e.g. after a failed forward)."""
        ids = [p.request_id for p in self.pending] + list(self.running)
        self.pending.clear()
        for seq in list(self.running.values()):
            self._finish(seq, reason)
        return ids

    @property
    def active(self) -> int:
        return len(self.running) + len(self.pending)

    @property
    def free_slots(self) -> int:
        return self.cache.free_slots

    @property
    def decoding(self) -> int:
        return sum(1 for s in self.running.values() if s.next_input is not None)

    # -- the loop ------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        decoding = [s for s in self.running.values() if s.next_input is not None]
        self._admit()
        outputs = self._prefill()
        if decoding:
            logits = self.model.decode(self.cache, [s.slot for s in decoding], [s.next_input for s in decoding])
            outputs += self._sample(decoding, logits)
        return outputs

    def run_to_completion(self) -> dict[str, SequenceState]:
        while self.running or self.pending:
            if not self.running and not self.cache.free_slots:
                raise ResourceExhausted("no free KV-cache slot and nothing running")
            self.step()
        return self.finished

    # -- internals -----------------------------------------------------------------
    def _admit(self) -> None:
        stop_default = [self.model.tokenizer.special.eot]
        while self.pending and self.cache.free_slots:
            p = self.pending.pop(0)
            stops = p.params.stop_ids if p.params.stop_ids is not None else stop_default
            self.running[p.request_id] = SequenceState(
                p.request_id, self.cache.allocate(), Sampler(p.params, p.input_ids, stops, self.model.device),
                p.params, len(p.input_ids), embeds=p.embeds)

    def _prefill(self) -> list[StepOutput]:
        budget = self.prefill_budget if self.prefill_budget is not None else float("inf")
        seqs, chunks = [], []
        for seq in self.running.values():
            if seq.embeds is None or budget <= 0:
                continue
            n = int(min(seq.prompt_len - seq.prefilled, budget))
            seqs.append(seq)
            chunks.append(seq.embeds[seq.prefilled: seq.prefilled + n])
            budget -= n
        if not seqs:
            return []
        logits = self.model.forward_embeds(self.cache, [s.slot for s in seqs], chunks)
        done, done_logits = [], []
        for seq, chunk, row in zip(seqs, chunks, logits):
            seq.prefilled += chunk.shape[0]
            if seq.prefilled == seq.prompt_len:
                seq.embeds = None
                done.append(seq)
                done_logits.append(row)
        return self._sample(done, done_logits) if done else []

    def _sample(self, seqs: list[SequenceState], logits) -> list[StepOutput]:
        out = []
        for seq, row in zip(seqs, logits):
            tok = seq.sampler(row)
            if seq.sampler.is_stop(tok):
                self._finish(seq, "stop")
                out.append(StepOutput(seq.request_id, None, True, "stop"))
                continue
            seq.output_ids.append(tok)
            seq.next_input = tok
            done = len(seq.output_ids) >= seq.params.max_new_tokens
            if done:
                self._finish(seq, "length")
            out.append(StepOutput(seq.request_id, tok, done, "length" if done else None))
        return out

    def _finish(self, seq: SequenceState, reason: str) -> None:
        seq.finished = True
        seq.finish_reason = reason
        seq.embeds = None
        self.running.pop(seq.request_id, None)
        self.cache.free(seq.slot)
        if self.keep_finished:
            self.finished[seq.request_id] = seq


@torch.inference_mode()
def generate_full_recompute(model, input_ids, audio_embeds: Sequence = (), max_new_tokens: int = 32,
                            stop_ids: Sequence[int] | None = None) -> list[int]:
    """Greedy generation that re-runs the whole sequence for every token, as the
    official HF script does (spec §6.1). Kept as the baseline for tests and bench."""
    ids = [int(i) for i in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
    stops = set(stop_ids if stop_ids is not None else [model.tokenizer.special.eot])
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(model.logits(ids + out, audio_embeds)[-1]))
        if tok in stops:
            break
        out.append(tok)
    return out
