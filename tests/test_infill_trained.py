"""Infilling on a tiny trained whole-sequence model, judged by the data's own likelihood.

The data are paths of a known Markov chain (each token has two likely successors), so the true log-likelihood of
any sequence is a closed form: an independent oracle. A model trained for a few seconds must fill a span between
a prefix and a suffix with sequences far more likely under the chain than a random fill.
"""

from __future__ import annotations

import pytest
import torch

import bd3lm
from bd3lm.objectives import loss as training_loss
from bd3lm.sampling import generate

N_CLEAN, LENGTH = 6, 12


def _chain() -> tuple[torch.Tensor, torch.Tensor]:
    """(initial, transition) of a peaked Markov chain over the clean tokens: i -> i+1 (0.6) or i+2 (0.35)."""
    trans = torch.full((N_CLEAN, N_CLEAN), 0.05 / (N_CLEAN - 2), dtype=torch.float64)
    for i in range(N_CLEAN):
        trans[i, (i + 1) % N_CLEAN] = 0.6
        trans[i, (i + 2) % N_CLEAN] = 0.35
    return torch.full((N_CLEAN,), 1.0 / N_CLEAN, dtype=torch.float64), trans


def _sample(n: int, gen: torch.Generator) -> torch.Tensor:
    init, trans = _chain()
    x = torch.empty(n, LENGTH, dtype=torch.long)
    x[:, 0] = torch.multinomial(init, n, replacement=True, generator=gen)
    for i in range(1, LENGTH):
        x[:, i] = torch.multinomial(trans[x[:, i - 1]], 1, generator=gen)[:, 0]
    return x


def _log_lik(x: torch.Tensor) -> torch.Tensor:
    init, trans = _chain()
    return torch.log(init[x[:, 0]]) + torch.log(trans[x[:, :-1], x[:, 1:]]).sum(1)


@pytest.mark.slow
@pytest.mark.parametrize(("graph", "loss", "sampler"), [("absorbing", "subs", "first_hitting"),
                                                         ("absorbing", "cedd", "analytic"),
                                                         ("roulette", "cedd", "analytic")])
def test_trained_infill_beats_random_fill(graph: str, loss: str, sampler: str) -> None:
    torch.manual_seed(0)
    cfg = bd3lm.BD3LMConfig(vocab_size=N_CLEAN + 1, model_length=LENGTH, block_size=LENGTH, hidden_dim=64,
                            cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0, graph=graph, loss=loss,
                            p_m=0.8 if graph == "roulette" else None, time_conditioning=graph != "absorbing")
    model = bd3lm.BD3LM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(300):
        out = training_loss(model, _sample(64, gen), generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    x = _sample(200, torch.Generator().manual_seed(2))
    prefix, span, suffix = x[0, :4], 4, x[0, 8:].tolist()
    res = generate(model, prefix, span, sampler=sampler, suffix=suffix, num_samples=200, seed=3)
    filled = torch.stack(res.sequences)
    assert bool((filled[:, :4] == prefix).all()) and filled[:, 8:].tolist() == [suffix] * 200
    random_fill = filled.clone()
    random_fill[:, 4:8] = torch.randint(0, N_CLEAN, (200, 4), generator=torch.Generator().manual_seed(4))
    truth = x[0:1].expand(200, -1)
    ll_model, ll_random, ll_true = (float(_log_lik(v).mean()) for v in (filled, random_fill, truth))
    # random fill pays ~ log(0.05/4) ≈ -4.4 nats per unlikely transition; the chain's own paths ~ -0.8
    assert ll_model > ll_random + 6.0, (ll_model, ll_random, ll_true)
