"""The batched sampler draws from the distribution the parameters describe: temperature, top-k,
min-p and top-p cut the same tokens as the textbook definitions, a seed gives the same tokens
whatever shares the batch, and rows with different parameters in one batch each get their own.
(Pure tensors: the engine tests run the same sampler with the real model.)"""

from __future__ import annotations

import math

import pytest
import torch

from llm_pool.params import GenerationParams
from llm_pool.sampling import CANDIDATES, RowSampler, choose_tokens

CPU = torch.device("cpu")


def reference(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """The distribution by the definitions, one row, the whole vocabulary sorted."""
    x = (logits - logits.max()) / p.temperature
    if p.top_k:
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], -math.inf)
    if p.min_p:
        x = x.masked_fill(x < math.log(p.min_p), -math.inf)
    order = torch.argsort(x, descending=True)
    probs = torch.softmax(x[order], -1)
    keep = probs.cumsum(-1) - probs <= p.top_p
    out = torch.zeros_like(x)
    out[order[keep]] = probs[keep] / probs[keep].sum()
    return out


def draw(row: torch.Tensor, settings: dict, rows: int = 100, steps: int = 20) -> torch.Tensor:
    """Empirical distribution of `rows` x `steps` draws (each row its own seed)."""
    samplers = [RowSampler(GenerationParams.validated(seed=i, **settings), [], CPU) for i in range(rows)]
    counts = torch.zeros(row.shape[0])
    logits = row.unsqueeze(0).repeat(rows, 1)
    for _ in range(steps):
        tokens, _, _ = choose_tokens(logits, samplers)
        counts += torch.bincount(torch.tensor(tokens), minlength=row.shape[0])
    return counts / counts.sum()


def buckets(probs: torch.Tensor) -> torch.Tensor:
    """The first five tokens one by one, the rest in ten runs of neighbours."""
    return torch.cat([probs[:5], torch.stack([c.sum() for c in probs[5:].chunk(10)])])


# a peaked row (nucleus within the candidates) and a flat one (a top-p nucleus bigger than them)
PEAKED = torch.cat([torch.tensor([6.0, 5.5, 5.0, 4.0, 3.0]), torch.zeros(4000)])
FLAT = torch.linspace(1.0, 0.0, 4000)

CASES = [
    (PEAKED, dict(temperature=1.0)),
    (PEAKED, dict(temperature=0.7, top_p=0.8)),
    (PEAKED, dict(temperature=1.3, top_k=3)),
    (PEAKED, dict(temperature=1.0, min_p=0.3)),
    (FLAT, dict(temperature=0.5, top_p=0.5)),  # nucleus of ~1500 tokens: the whole-vocabulary path
    (FLAT, dict(temperature=1.0, top_k=CANDIDATES + 100)),
]


@pytest.mark.parametrize("row,settings", CASES)
def test_draws_follow_the_distribution_the_parameters_define(row, settings):
    want = reference(row, GenerationParams.validated(**settings))
    got = draw(row, settings)
    assert float(got[want == 0].sum()) == 0  # nothing outside the cut is ever drawn
    # total variation distance of 2000 draws from the true distribution, over 15 buckets
    assert 0.5 * float((buckets(got) - buckets(want)).abs().sum()) < 0.06


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch():
    row = PEAKED
    mine = GenerationParams.validated(temperature=0.9, top_p=0.95, seed=11)
    alone = [RowSampler(mine, [], CPU)]
    crowded = [RowSampler(GenerationParams.validated(temperature=t, top_k=k), [], CPU)
               for t, k in ((0.0, 0), (1.5, 2), (0.3, 0))] + [RowSampler(mine, [], CPU)]
    a = [choose_tokens(row.unsqueeze(0), alone)[0][0] for _ in range(200)]
    b = [choose_tokens(row.unsqueeze(0).repeat(4, 1), crowded)[0][3] for _ in range(200)]
    assert a == b and len(set(a)) > 1


def test_greedy_rows_take_the_argmax_after_their_own_bias():
    logits = PEAKED.unsqueeze(0).repeat(2, 1)
    plain = RowSampler(GenerationParams.validated(temperature=0), [], CPU)
    biased = RowSampler(GenerationParams.validated(temperature=0, logit_bias={"7": 100}), [], CPU)
    tokens, logprobs, _ = choose_tokens(logits, [plain, biased])
    assert tokens == [0, 7]
    # logprobs describe the model's own distribution, before the bias
    assert logprobs[1] == pytest.approx(float(torch.log_softmax(PEAKED, -1)[7]), abs=1e-5)
