"""The score-entropy family in block mode: block size 1 is exact AR on the absorbing graph, block size L is the
whole-sequence model, and the loss / bound entry points dispatch and validate.

Oracles: the cross-entropy of an all-masked forward computed by hand (the AR likelihood of a block-size-1
network), SEDD's mass penalty written out, a plain whole-sequence forward, statistical tolerances from repeated
independent estimates.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bd3lm
from bd3lm.objectives import exact_nll, loss, nelbo
from bd3lm.score_objectives import score_bound, score_loss
from tests.conftest import randomize, tiny_config


def _model(**kw) -> bd3lm.BD3LM:
    torch.manual_seed(0)
    return randomize(bd3lm.BD3LM(tiny_config(**kw)), 0, scale=0.3).eval()


def _ar_terms(model, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: Σ_i -log softmax(f_i)[x0_i] and Σ_i (u_i - 1 - log u_i), u_i = mean_clean exp(f_i), from one
    two-stream forward with every x_t token masked (each one-token block sees only the clean blocks before it)."""
    cfg = model.config
    x_t = torch.full_like(x0, cfg.mask_index)
    with torch.no_grad():
        f = model(input_ids=torch.cat([x_t, x0], 1), two_stream=True).logits.double()
    clean = torch.ones(cfg.vocab_size, dtype=torch.bool)
    clean[cfg.mask_index] = False
    logp = f[..., clean].log_softmax(-1)
    targets = x0 - (x0 > cfg.mask_index).long()
    ce = -logp.gather(-1, targets[..., None])[..., 0].sum(1)
    u = f[..., clean].exp().mean(-1)
    return ce, (u - 1 - u.log()).sum(1)


def _repeat(fn, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    runs = torch.stack([fn(i) for i in range(n)])
    return runs.mean(0), runs.std(0) / math.sqrt(n)


@pytest.mark.parametrize("loss_name", ["subs", "cedd", "score_entropy"])
def test_block_size_one_absorbing_is_exact_ar(loss_name: str) -> None:
    """L' = 1 on the absorbing graph: the exact NLL is the AR cross-entropy for every loss, and the J1 bound's
    expectation equals it (cedd / subs: the mean parameterisation) or it plus SEDD's mass penalty
    (score_entropy)."""
    model = _model(block_size=1, loss=loss_name)
    x0 = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    ce, penalty = _ar_terms(model, x0)
    torch.testing.assert_close(exact_nll(model, x0).double(), ce, rtol=0, atol=1e-4)
    mean, se = _repeat(lambda i: score_bound(model, x0, num_samples=8, generator=torch.Generator().manual_seed(i)),
                       24)
    target = ce + (penalty if loss_name == "score_entropy" else 0.0)
    assert bool(((mean - target).abs() <= 4 * se + 1e-6).all()), (mean, target, se)
    if loss_name == "score_entropy":
        assert bool((penalty > 1e-3).all())  # the oracle distinguishes the two parameterisations


@pytest.mark.parametrize(("graph", "loss_name", "p_m"), [("absorbing", "score_entropy", None),
                                                         ("uniform", "cedd", None), ("roulette", "score_entropy", 0.5)])
def test_block_size_l_is_the_whole_sequence_pass(graph: str, loss_name: str, p_m) -> None:
    """L' = L: the two-stream pass with σ on x_t and 0 on x_0 gives the plain whole-sequence logits (one σ per
    sequence), so the block objective is the whole-sequence objective."""
    model = _model(block_size=16, graph=graph, loss=loss_name, p_m=p_m, time_conditioning=True).double()
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, 33, (2, 16), generator=gen)
    x0 = torch.randint(0, 32, (2, 16), generator=gen)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    ts = torch.cat([sigma[:, None].expand(-1, 16), torch.zeros(2, 16, dtype=torch.float64)], 1)
    with torch.no_grad():
        two = model(input_ids=torch.cat([x_t, x0], 1), timesteps=ts, two_stream=True).logits
        plain = model(input_ids=x_t, timesteps=sigma).logits
    torch.testing.assert_close(two, plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("graph", "loss_name", "p_m"), [("absorbing", "score_entropy", None),
                                                         ("uniform", "score_entropy", None),
                                                         ("roulette", "cedd", 0.9), ("uniform", "cedd", None)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_score_loss_trains_every_graph_and_block_size(graph: str, loss_name: str, p_m, block_size: int) -> None:
    """The family's loss is finite and >= 0, dispatches from objectives.loss, reaches every parameter that
    matters, and a few Adam steps on one batch lower it (a fixed t and noise draw: the same objective)."""
    torch.manual_seed(0)
    model = bd3lm.BD3LM(tiny_config(block_size=block_size, graph=graph, loss=loss_name, p_m=p_m,
                                    time_conditioning=True))
    x0 = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(2))
    t = torch.full((4, 16 // block_size), 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        out = loss(model, x0, t=t, generator=torch.Generator().manual_seed(3))
        value = float(out.loss.detach())
        assert math.isfinite(value) and value >= 0
        first = value if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert value < 0.9 * first


def test_cedd_log_weight_and_nelbo_dispatch() -> None:
    model = _model(block_size=4, loss="cedd")
    x0 = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((2, 4), 0.25)
    one = score_loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
    log = score_loss(model, x0, t=t, generator=torch.Generator().manual_seed(1), cedd_weight="log")
    torch.testing.assert_close(log.loss, one.loss * math.log(math.e + 0.3 / 0.25))
    a = nelbo(model, x0, generator=torch.Generator().manual_seed(5))
    b = score_bound(model, x0, generator=torch.Generator().manual_seed(5)).float()
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="cedd_weight"):
        score_loss(model, x0, cedd_weight="square")


def test_family_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown graph 'ring'"):
        tiny_config(graph="ring")
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        tiny_config(loss="mse")
    with pytest.raises(ValueError, match="'subs'.*absorbing graph only"):
        tiny_config(graph="uniform", loss="subs")
    for bad in (-0.1, 1.5, None, "0.5", "abc"):
        with pytest.raises(ValueError, match="p_m must be a number in \\[0, 1\\]"):
            tiny_config(graph="roulette", loss="cedd", p_m=bad)
    model = _model(graph="uniform", loss="cedd")
    ar = _model(block_size=1, causal=True, cross_attn=False, adaln=False)
    with pytest.raises(ValueError, match="AR model's NLL is exact"):
        nelbo(ar, torch.zeros(1, 16, dtype=torch.long), estimator="j1")
    with pytest.raises(ValueError, match="estimator"):
        score_bound(model, torch.zeros(1, 16, dtype=torch.long), estimator="j3")
    with pytest.raises(ValueError, match="integer token ids"):
        score_loss(model, torch.zeros(1, 16))


def test_cross_entropy_helper_matches_torch() -> None:
    """Sanity of the oracle above: _ar_terms' CE equals F.cross_entropy with the mask logit removed."""
    model = _model(block_size=1)
    x0 = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(4))
    ce, _ = _ar_terms(model, x0)
    with torch.no_grad():
        f = model(input_ids=torch.cat([torch.full_like(x0, 32), x0], 1), two_stream=True).logits.double()
    f[..., 32] = float("-inf")
    ref = F.cross_entropy(f.reshape(-1, 33), x0.reshape(-1), reduction="none").view(2, 16).sum(1)
    torch.testing.assert_close(ce, ref)



@pytest.mark.parametrize("p_m", [0.05, 0.5, 1.0])
def test_j2_constants_are_the_k_term_integral(p_m: float) -> None:
    """J2 replaces ``∫ σ' E_{x_t|x_0} Σ_y Q[x_t, y] K(r_y) dt`` over the bound's range [σ_lo, σ_hi] by
    ``H(p_{σ_hi|0}) - H(p_{σ_lo|0}) - outflow(σ_lo, σ_hi)``. Checked per token by quadrature in σ and
    enumeration of x_t from the dense transition matrix, with the bound's own ends on the log-linear schedule
    (t_min = 0.5, T = 1 - 1e-6: σ from 0.69 to 13.8). With p_m = 0.05 about half the clean mass survives at σ_hi, so
    constants taken at σ = ∞ would be off by nats."""
    import numpy as np

    from bd3lm.graphs import make_graph, score_entropy_k
    from bd3lm.schedules import get_schedule
    from bd3lm.score_objectives import sigma_and_rate

    graph = make_graph("roulette", 6, 5, p_m)
    lo, hi = (float(v) for v in sigma_and_rate(get_schedule("loglinear"), torch.tensor([0.5, 1.0]))[0])
    nodes, weights = np.polynomial.legendre.leggauss(200)
    u = (nodes + 1) / 2
    total = 0.0
    for uk, wk in zip(u, weights / 2, strict=True):
        sigma = lo + (hi - lo) * uk
        p = graph.transition_matrix(sigma)[:, 0]  # x_0 = 0
        for xt in range(6):
            if p[xt] <= 0:
                continue
            r = graph.conditional_ratios(torch.tensor(xt), torch.tensor(0), torch.tensor(sigma, dtype=torch.float64))
            q = graph.rate_into(torch.tensor(xt), torch.float64)
            total += wk * (hi - lo) * float(p[xt]) * float((q * score_entropy_k(r)).sum())
    const = graph.conditional_entropy(hi) - graph.conditional_entropy(lo) - graph.outflow_integral(lo, hi)
    assert total == pytest.approx(const, rel=1e-6, abs=1e-9)
    if p_m < 0.1:  # the top of the range matters: σ = ∞ constants would be far off
        assert abs(graph.outflow_integral(lo, math.inf) - graph.outflow_integral(lo, hi)) > 1.0
