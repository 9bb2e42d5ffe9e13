"""Choosing the next token for each row of a batch, each with its own parameters.

Per row, only what is the row's own is done row by row: its logit bias and penalties, its
grammar's mask, and one uniform draw from its own seeded generator (so a request's output does not
depend on what else shares its batch). Everything else is done for the whole batch at once:
greedy rows with one argmax; sampled rows with one temperature division, one `topk` that yields
the candidates (top-k, min-p and top-p are cut within them), and one inverse-CDF draw. A full sort
of the vocabulary, the costly part of top-p, is only needed by a row whose nucleus holds more than
`CANDIDATES` tokens, which a language model's distribution at a usable temperature rarely has.
Measured in `bench/long_prompts.py --sampling`.
"""

from __future__ import annotations

import math
import os

import torch

from .constraints import TokenConstraint
from .params import GenerationParams

CANDIDATES = 256  # tokens considered by one topk per sampled row


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
        self._device = device
        # tokens for the repetition penalty: a set, and their ids as a tensor rebuilt when it grows
        self._seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self._seen_ids: torch.Tensor | None = None
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

    @property
    def greedy(self) -> bool:
        return self.params.greedy or self.params.temperature < 1e-4  # float32 cannot divide by less

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.consume(token_id)
        if self._seen is not None and token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids = None
        if self._counts is not None:
            self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def shape(self, logits: torch.Tensor) -> None:
        """Apply this row's own changes to its logits ([vocab] float, changed in place): logit
        bias, presence/frequency penalties, the grammar's mask, the repetition penalty."""
        params = self.params
        if self._bias is not None:
            ids, values = self._bias
            logits[ids] += values
        if self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32, device=logits.device)
            logits[ids] -= counts * params.frequency_penalty + params.presence_penalty
        if self.constraint is not None:  # tokens the grammar does not allow next become -inf
            logits.copy_(self.constraint.restrict(logits))
        if self._seen:
            if self._seen_ids is None:
                self._seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=logits.device)
            picked = logits[self._seen_ids]
            penalty = params.repetition_penalty
            penalized = torch.where(picked > 0, picked / penalty, picked * penalty)
            logits[self._seen_ids] = penalized.clamp(-1e30, 1e30)  # a tiny penalty must not make inf

    def uniform(self) -> torch.Tensor:
        return torch.rand((), generator=self.generator, device=self._device)


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]
                  ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """logits: [batch, vocab] for the last position of each row. Returns the chosen tokens, their
    log-probabilities under the model's own distribution (before sampling settings), and for rows
    that asked for them the top alternatives as (token, logprob), best first."""
    chosen = torch.argmax(logits, dim=-1)
    shaped_rows = [i for i, s in enumerate(samplers) if not s.simple_greedy]
    if shaped_rows:
        shaped = logits[shaped_rows].float().clone()
        for j, i in enumerate(shaped_rows):
            samplers[i].shape(shaped[j])
        chosen[shaped_rows] = _sample(shaped, [samplers[i] for i in shaped_rows])
    norm = torch.logsumexp(logits, dim=-1)
    logprobs = (logits.gather(1, chosen.unsqueeze(1)).squeeze(1) - norm).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in samplers]
    wanted = [i for i, s in enumerate(samplers) if s.top_n]
    if wanted:
        values, ids = torch.topk(logits[wanted], max(samplers[i].top_n for i in wanted))
        for j, i in enumerate(wanted):
            n = samplers[i].top_n
            tops[i] = list(zip(ids[j, :n].tolist(), (values[j, :n] - norm[i]).tolist()))
    return chosen.tolist(), logprobs, tops


def _sample(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """Tokens for rows whose logits are already shaped: the argmax for greedy rows, a draw from
    the temperature / top-k / min-p / top-p distribution for the others."""
    chosen = torch.argmax(logits, dim=-1)
    best = logits.max(dim=-1, keepdim=True).values
    rows = [j for j, s in enumerate(samplers) if not s.greedy and math.isfinite(float(best[j]))]
    if not rows:
        return chosen
    device, vocab = logits.device, logits.shape[-1]
    params = [samplers[j].params for j in rows]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    raw, best = logits[rows], best[rows]
    temperature = column([p.temperature for p in params])
    min_p = column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])

    def scaled(x: torch.Tensor, n: slice | list[int]) -> torch.Tensor:
        # shifted so the best logit is 0 before dividing: a tiny temperature makes the others
        # -inf; min-p: the best is 0, so a token's probability ratio to it is exp(logit)
        x = (x - best[n]) / temperature[n]
        return x.masked_fill(x < min_p[n], -math.inf) if any(p.min_p > 0 for p in params) else x

    k = min(vocab, max([CANDIDATES] + [p.top_k for p in params if p.top_k]))
    values, ids = torch.topk(raw, k)  # the same order after shifting and dividing: best first
    values = scaled(values, slice(None))
    top_k = torch.tensor([p.top_k if p.top_k and p.top_k < vocab else vocab for p in params],
                         device=device).unsqueeze(1)
    values = values.masked_fill(torch.arange(k, device=device)[None, :] >= top_k, -math.inf)
    # the distribution's normalizer: the candidates alone under top-k, else every token left
    cut = top_k[:, 0] <= k
    norm = torch.logsumexp(values, -1)
    uncut = [n for n in range(len(rows)) if not bool(cut[n])]
    if uncut:
        norm[uncut] = torch.logsumexp(scaled(raw[uncut], uncut), -1)
    probs = torch.exp(values - norm.unsqueeze(1))
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    top_p = column([p.top_p for p in params])
    values = values.masked_fill(before > top_p, -math.inf)
    # the candidates hold the whole distribution if top-k cut it, if min-p cut it, or if the
    # nucleus ends inside them; else (top-p 1, or a flat distribution) the row draws from all
    inside = cut | (values[:, -1] == -math.inf) | (before[:, -1] + probs[:, -1] > top_p[:, 0])
    uniforms = torch.stack([samplers[j].uniform() for j in rows])
    drawn = ids.gather(1, _draw(values, uniforms).unsqueeze(1)).squeeze(1)
    for n in range(len(rows)):
        if not bool(inside[n]):
            drawn[n] = _draw_from_all(scaled(raw[n:n + 1], slice(n, n + 1))[0], params[n].top_p, uniforms[n])
    chosen[rows] = drawn
    return chosen


def _draw(values: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row, with probability softmax(values), by inverse CDF from `uniforms`."""
    cdf = torch.softmax(values, dim=-1).cumsum(-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=values.shape[-1] - 1)


def _draw_from_all(x: torch.Tensor, top_p: float, uniform: torch.Tensor) -> int:
    """A row whose distribution is not within the candidates: the whole vocabulary (sorted only
    for a top-p cut)."""
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        sorted_x = sorted_x.masked_fill(probs.cumsum(-1) - probs > top_p, -math.inf)
        return int(order[_draw(sorted_x.unsqueeze(0), uniform.unsqueeze(0))[0]])
    return int(_draw(x.unsqueeze(0), uniform.unsqueeze(0))[0])
