"""Per-request sampling (spec §2.4): greedy, temperature, top-k, top-p, repetition
penalty, a seed per request, plus the controls users also get for steering output
(OpenAI-style ``logit_bias``, an allowed-token set, ``min_tokens``).

The order of logit processors follows transformers' ``generate`` (which the reference
uses): repetition penalty over prompt + generated ids, then temperature, top-k, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepaudio2.runtime.errors import InvalidArgument


@dataclass
class SamplingParams:
    max_new_tokens: int = 2048            # the reference's default when unset (spec §2.4)
    temperature: float = 0.0              # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                        # 0 = off
    repetition_penalty: float = 1.0       # 1 = off
    seed: int | None = None
    stop_ids: list[int] | None = None     # None = the model's <|EOT|>
    min_tokens: int = 0                   # stop ids are banned before this many tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def bad(name, why):
            raise InvalidArgument(why, field=name)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if not (self.repetition_penalty > 0.0):
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_new_tokens:
            bad("min_tokens", f"must be in [0, max_new_tokens], got {self.min_tokens!r}")
        ids = list(self.logit_bias) + list(self.allowed_token_ids or []) + list(self.stop_ids or [])
        if vocab_size is not None:
            for i in ids:
                if not 0 <= int(i) < vocab_size:
                    bad("token id", f"{i} is outside the vocabulary [0, {vocab_size})")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids", "must not be empty")
        return self


class Sampler:
    """Sampling state of one sequence: its params, its RNG, the ids seen so far."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: list[int], device="cpu"):
        self.p = params
        self.stop_ids = list(stop_ids)
        self.seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=device)
        self.generated: list[int] = []
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else
                                       int(torch.randint(0, 2**62, (1,)).item()))
        self._allowed = None
        if params.allowed_token_ids is not None:
            self._allowed = torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] of the next position -> the chosen id."""
        p = self.p
        scores = logits.float().clone()
        if p.logit_bias:
            idx = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=scores.device)
            scores[idx] += torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype, device=scores.device)
        if self._allowed is not None:
            keep = scores[self._allowed]
            scores.fill_(float("-inf"))
            scores[self._allowed] = keep
        if len(self.generated) < p.min_tokens and self.stop_ids:
            scores[torch.tensor(self.stop_ids, device=scores.device)] = float("-inf")
        if p.repetition_penalty != 1.0 and self.seen.numel():
            s = scores[self.seen]
            scores[self.seen] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        if p.temperature == 0.0:
            tok = int(torch.argmax(scores))
        else:
            scores = scores / p.temperature
            if p.top_k > 0 and p.top_k < scores.numel():
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=False)
                cum = sorted_scores.softmax(-1).cumsum(-1)
                remove = cum <= (1.0 - p.top_p)
                remove[-1] = False  # keep at least the most likely token
                scores = scores.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
            probs = scores.softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=self.generator))
        self.generated.append(tok)
        if p.repetition_penalty != 1.0:
            self.seen = torch.unique(torch.cat([self.seen, torch.tensor([tok], device=self.seen.device)]))
        return tok

    def is_stop(self, tok: int) -> bool:
        return tok in self.stop_ids
