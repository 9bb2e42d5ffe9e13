"""Choosing the next token for each row of a batch, each with its own parameters.

Greedy rows are decided together with one argmax; sampled rows each apply their repetition
penalty, temperature, top-k and top-p and draw from their own seeded generator, so a request's
output does not depend on what else shares its batch.
"""

from __future__ import annotations

import os

import torch

from .constraints import TokenConstraint
from .params import GenerationParams


class RowSampler:
    """Per-request sampling state: parameters, a seeded generator and the tokens seen so far."""

    def __init__(self, params: GenerationParams, prompt_ids: list[int], device: torch.device,
                 constraint: TokenConstraint | None = None, top_n: int = 0):
        self.params = params
        self.constraint = constraint
        self.top_n = top_n  # alternatives to report per position (top_logprobs)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "big")
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=device)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = (torch.tensor(ids, dtype=torch.long, device=device),
                          torch.tensor(values, dtype=torch.float32, device=device))
        # presence / frequency penalties count generated tokens only (as vLLM and OpenAI do)
        self._counts: dict[int, int] | None = {} if params.presence_penalty or params.frequency_penalty else None

    @property
    def simple_greedy(self) -> bool:
        return (self.params.greedy and self._seen is None and self.constraint is None
                and not self.params.shapes_logits)

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.consume(token_id)
        if self._seen is not None:
            self._seen = torch.unique(torch.cat([self._seen, self._seen.new_tensor([token_id])]))
        if self._counts is not None:
            self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        params = self.params
        logits = logits.float().clone()
        if self._bias is not None:
            ids, values = self._bias
            logits[ids] += values
        if self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32, device=logits.device)
            logits[ids] -= counts * params.frequency_penalty + params.presence_penalty
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float tensor of one row."""
        params = self.params
        if self._bias is not None or self._counts:
            logits = self._shape(logits)
        if self.constraint is not None:  # tokens the grammar does not allow next become -inf
            logits = self.constraint.restrict(logits)
        if self._seen is not None and self._seen.numel():
            logits = logits.float().clone()
            picked = logits[self._seen]
            penalty = params.repetition_penalty
            penalized = torch.where(picked > 0, picked / penalty, picked * penalty)
            logits[self._seen] = penalized.clamp(-1e30, 1e30)  # a tiny penalty must not make inf
        if params.greedy or params.temperature < 1e-4:  # float32 cannot divide by less: it is the argmax
            return int(torch.argmax(logits))
        # shifted so the best logit is 0 before dividing: a tiny temperature makes the others -inf
        # (the argmax), never inf - inf = nan (which failed every row sharing the batch)
        logits = (logits.float() - logits.max()) / params.temperature
        if params.top_k and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.min_p > 0.0:  # logits are shifted so the best is 0: its probability ratio is exp(logit)
            logits = logits.masked_fill(logits < torch.log(torch.tensor(params.min_p)), float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits.float(), dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:  # never fail the batch
            return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]
                  ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """logits: [batch, vocab] for the last position of each row. Returns the chosen tokens, their
    log-probabilities under the model's own distribution (before sampling settings), and for rows
    that asked for them the top alternatives as (token, logprob), best first."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    chosen = [g if s.simple_greedy else s.choose(logits[i]) for i, (g, s) in enumerate(zip(greedy, samplers))]
    norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, torch.tensor(chosen, device=logits.device).unsqueeze(1)).squeeze(1)
    logprobs = (picked - norm).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in samplers]
    for i, sampler in enumerate(samplers):
        if sampler.top_n:
            values, ids = torch.topk(logits[i], sampler.top_n)
            tops[i] = list(zip(ids.tolist(), (values - norm[i]).tolist()))
    return chosen, logprobs, tops
