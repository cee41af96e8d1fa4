"""Likelihood bounds of the score-entropy family (:mod:`bd3lm.graphs`, :mod:`bd3lm.score_objectives`).

The toy tests (notes /work/shared/research/sedd-mdlm.md §5 items 9–10) enumerate a two-token sequence model
exactly: 3 clean tokens plus the mask state (V = 4, mask id 3; the uniform graph leaves it isolated), a random data
distribution over the 9 clean sequences, σ(t) = 8t. The forward process is independent per token, so
``p_{t|0}(x|x0) = Π_i expm(σQ)[x^i, x0^i]`` with Q built by hand and ``scipy.linalg.expm``; marginals, exact scores,
KL and cross-entropies are enumerated over the 16 sequences. Only the per-position score entropy comes from the
library (the function under test). Time integrals use t = u^4 with Gauss–Legendre nodes in u (the uniform
integrand has a log(1/t) singularity at 0).

The model tests run a tiny random-weight :class:`bd3lm.BD3LM` (§4.1 identity, J1 vs J2 Monte Carlo agreement).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import bd3lm
from bd3lm.graphs import make_graph
from bd3lm.schedules import get_schedule
from bd3lm.score_objectives import log_score, score_bound, sigma_and_rate
from tests.conftest import randomize
from tests.test_graphs import expm

V, MASK, N, L = 4, 3, 3, 2
SEQS = list(itertools.product(range(V), repeat=L))
CLEAN = [s for s in SEQS if MASK not in s]
INDEX = {s: k for k, s in enumerate(SEQS)}
SIGMA_RATE = 8.0  # σ(t) = 8 t
TOY_GRAPHS = [("absorbing", None), ("uniform", None), ("roulette", 0.5)]
TOY_IDS = ["absorbing", "uniform", "roulette-0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_q(p_m: float) -> np.ndarray:
    """``p_m Q_abs + (1 - p_m) U`` from the definition (``Q[a, b]`` = rate of ``b -> a``)."""
    q = np.zeros((V, V))
    for j in range(V):
        if j == MASK:
            continue
        q[MASK, j] += p_m
        q[j, j] -= p_m
        for i in range(V):
            if i != MASK:
                q[i, j] += (1 - p_m) * (1.0 / N - (1.0 if i == j else 0.0))
    return q


def seq_conditional(q: np.ndarray, sigma: float) -> np.ndarray:
    """``p_{t|0}(x | x0)`` (16, 9) for independent tokens."""
    p = expm(q, sigma).clip(min=0)  # expm leaves ±1e-17 where the probability is exactly 0
    return np.array([[p[x[0], z[0]] * p[x[1], z[1]] for z in CLEAN] for x in SEQS])


def exact_log_scores(pt: np.ndarray) -> np.ndarray:
    """``log s(x)_{i,y} = log p_t(x^{i←y}) / p_t(x)`` (16, L, V); 0 where p_t(x) = 0 or the neighbour has p_t = 0."""
    ls = np.zeros((len(SEQS), L, V))
    for k, x in enumerate(SEQS):
        if pt[k] <= 0:
            continue
        for i in range(L):
            for y in range(V):
                nb = list(x)
                nb[i] = y
                v = pt[INDEX[tuple(nb)]]
                ls[k, i, y] = math.log(v / pt[k]) if v > 0 else 0.0
    return ls


def time_nodes(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ∫_0^1 f(t) dt with t = u^4 and n-point Gauss–Legendre in u."""
    u, w = np.polynomial.legendre.leggauss(n)
    u, w = (u + 1) / 2, w / 2
    return u**4, w * 4 * u**3


def per_x0_integrals(graph, q, log_score_fn, n_nodes: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(∫ σ' E_{x_t|x0} Σ_i score_entropy dt, the same without K), each (9,) over x0, by enumeration.

    ``log_score_fn(t, pt)`` gives the (16, L, V) log scores at time t."""
    with_k, without_k = np.zeros(len(CLEAN)), np.zeros(len(CLEAN))
    xs = torch.tensor(SEQS)[:, None, :].expand(len(SEQS), len(CLEAN), L)
    zs = torch.tensor(CLEAN)[None].expand(len(SEQS), len(CLEAN), L)
    for t, w in zip(*time_nodes(n_nodes), strict=True):
        sigma = SIGMA_RATE * t
        cond = seq_conditional(q, sigma)
        ls = torch.tensor(log_score_fn(t, cond @ P0))[:, None].expand(len(SEQS), len(CLEAN), L, V)
        sig = torch.tensor(sigma, dtype=torch.float64)
        se = graph.score_entropy(ls, xs, zs, sig).numpy().sum(-1)  # (16, 9): Σ_i
        se_nk = graph.score_entropy_without_k(ls, xs, zs, sig).numpy().sum(-1)
        with_k += w * SIGMA_RATE * (cond * se).sum(0)
        without_k += w * SIGMA_RATE * (cond * se_nk).sum(0)
    return with_k, without_k


def kl(p: np.ndarray, q: np.ndarray) -> float:
    on = p > 0
    return float((p[on] * np.log(p[on] / q[on])).sum())


P0 = np.random.default_rng(2024).dirichlet(np.ones(len(CLEAN)))  # the data distribution over the 9 sequences


# -- 7. the ELBO is tight with exact scores ------------------------------------------------------------------


@pytest.mark.parametrize("name, p_m", TOY_GRAPHS, ids=TOY_IDS)
def test_exact_score_elbo_is_tight(name, p_m):
    """§1.1 / §5 item 9: with the exact sequence scores s(x_t)_{i,y} = p_t(x_t^{i←y}) / p_t(x_t) and π = p_1,
    -log p_0(x0) = ∫_0^1 σ' E_{x_t|x0} Σ_i score_entropy_i dt + KL(p_{1|0}(·|x0) || p_1) for every x0 (<= 1e-5)."""
    graph = make_graph(name, V, MASK, p_m)
    q = hand_q(graph.p_m)
    dwdse, _ = per_x0_integrals(graph, q, lambda t, pt: exact_log_scores(pt))
    cond1 = seq_conditional(q, SIGMA_RATE)
    p1 = cond1 @ P0
    bound = dwdse + np.array([kl(cond1[:, j], p1) for j in range(len(CLEAN))])
    np.testing.assert_allclose(bound, -np.log(P0), rtol=0, atol=1e-5)
    assert (dwdse > 0).all()


# -- 8. E[J1] = J2 for any model ----------------------------------------------------------------------------


def random_model(seed: int):
    """An arbitrary positive, time-dependent score table: log s_θ(x_t, t)_{i,y} = A + t B."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, (len(SEQS), L, V)), rng.normal(0, 1, (len(SEQS), L, V))
    return lambda t, pt: a + t * b


def factorised_prior(seed: int) -> np.ndarray:
    """A fixed full-support factorised π over the 16 sequences."""
    tok = np.random.default_rng(seed).dirichlet(np.ones(V))
    return np.array([tok[x[0]] * tok[x[1]] for x in SEQS])


def outflow(q: np.ndarray, pt: np.ndarray) -> float:
    """E_{p_t}[out(x_t)], out(x) = Σ_i -Q[x^i, x^i] (total forward exit rate of the sequence)."""
    return float(sum(pt[k] * sum(-q[x[i], x[i]] for i in range(L)) for k, x in enumerate(SEQS)))


@pytest.mark.parametrize("name, p_m", TOY_GRAPHS, ids=TOY_IDS)
def test_expected_j1_equals_j2_for_any_model(name, p_m):
    """§3.4 / §5 item 10: for an arbitrary model score table and a fixed factorised π,
    E_{x0}[∫ σ' E Σ_i score_entropy dt + KL(p_{1|0}(·|x0) || π)] (J1)
    = ∫ σ' E Σ_i score_entropy_without_k dt - ∫ σ' E_{p_t}[out(x_t)] dt + CE(p_1, π) (J2), to <= 1e-6; the outflow
    integral matches ``Graph.outflow_integral(0, 8)`` per token; the exact scores give a smaller bound than a
    random model, equal to H(p_0) when π = p_1."""
    graph = make_graph(name, V, MASK, p_m)
    q = hand_q(graph.p_m)
    pi = factorised_prior(7)
    cond1 = seq_conditional(q, SIGMA_RATE)
    p1 = cond1 @ P0
    prior_kl = np.array([kl(cond1[:, j], pi) for j in range(len(CLEAN))])
    ce = float(-(p1[p1 > 0] * np.log(pi[p1 > 0])).sum())
    ts, ws = time_nodes()
    out_int = sum(
        w * SIGMA_RATE * outflow(q, seq_conditional(q, SIGMA_RATE * t) @ P0) for t, w in zip(ts, ws, strict=True)
    )
    assert graph.outflow_integral(0.0, SIGMA_RATE) == pytest.approx(out_int / L, rel=1e-9)
    bounds = {}
    models = [("model", random_model(1)), ("other", random_model(2)), ("exact", lambda t, pt: exact_log_scores(pt))]
    for label, fn in models:
        with_k, without_k = per_x0_integrals(graph, q, fn)
        j1 = float(P0 @ (with_k + prior_kl))
        j2 = float(P0 @ without_k) - out_int + ce
        assert j1 == pytest.approx(j2, rel=0, abs=1e-6), (label, j1, j2)
        bounds[label] = j1
        if label == "exact":  # π = p_1: the bound is the data entropy
            tight = float(P0 @ (with_k + np.array([kl(cond1[:, j], p1) for j in range(len(CLEAN))])))
            assert tight == pytest.approx(float(-(P0 * np.log(P0)).sum()), abs=1e-6)
    assert bounds["exact"] < bounds["model"] and bounds["exact"] < bounds["other"]


@pytest.mark.parametrize("name, p_m", TOY_GRAPHS, ids=TOY_IDS)
def test_j1_j2_gap_when_noise_starts_above_zero(name, p_m):
    """When time starts at a total noise σ0 > 0 (σ(t) = σ0 + 8t, as the geometric schedule's σ(0) = σ_min), the same
    enumeration gives E[J1] - J2 = -E_{x0} H(p_{σ0|0}(·|x0)) (entropy production identity of §3.4, integrated from
    σ0 instead of 0), with the outflow integral from σ0 to σ0 + 8 (``Graph.outflow_integral(σ0, σ0 + 8)``)."""
    graph = make_graph(name, V, MASK, p_m)
    q = hand_q(graph.p_m)
    s0 = 0.05
    pi = factorised_prior(3)
    fn = random_model(5)
    with_k, without_k = np.zeros(len(CLEAN)), np.zeros(len(CLEAN))
    xs = torch.tensor(SEQS)[:, None, :].expand(len(SEQS), len(CLEAN), L)
    zs = torch.tensor(CLEAN)[None].expand(len(SEQS), len(CLEAN), L)
    out_int = 0.0
    for t, w in zip(*time_nodes(32), strict=True):
        sigma = s0 + SIGMA_RATE * t
        cond = seq_conditional(q, sigma)
        ls = torch.tensor(fn(t, None))[:, None].expand(len(SEQS), len(CLEAN), L, V)
        sig = torch.tensor(sigma, dtype=torch.float64)
        with_k += w * SIGMA_RATE * (cond * graph.score_entropy(ls, xs, zs, sig).numpy().sum(-1)).sum(0)
        without_k += w * SIGMA_RATE * (cond * graph.score_entropy_without_k(ls, xs, zs, sig).numpy().sum(-1)).sum(0)
        out_int += w * SIGMA_RATE * outflow(q, cond @ P0)
    assert graph.outflow_integral(s0, s0 + SIGMA_RATE) == pytest.approx(out_int / L, rel=1e-9)
    cond1 = seq_conditional(q, s0 + SIGMA_RATE)
    p1 = cond1 @ P0
    j1 = float(P0 @ (with_k + np.array([kl(cond1[:, j], pi) for j in range(len(CLEAN))])))
    j2 = float(P0 @ without_k) - out_int + float(-(p1[p1 > 0] * np.log(pi[p1 > 0])).sum())
    c0 = seq_conditional(q, s0)
    ent0 = float(sum(P0[j] * -(c0[c0[:, j] > 0, j] * np.log(c0[c0[:, j] > 0, j])).sum() for j in range(len(CLEAN))))
    assert ent0 > 0.1
    assert j1 - j2 == pytest.approx(-ent0, abs=1e-6)
    # the per-token closed form score_bound's J2 subtracts to stay unbiased for J1 (L tokens, any x0)
    assert L * graph.conditional_entropy(s0) == pytest.approx(ent0, rel=1e-10)


# -- 9. a tiny real model -----------------------------------------------------------------------------------


def tiny(graph: str, loss: str, block_size: int = 16, seed: int = 0) -> bd3lm.BD3LM:
    cfg = bd3lm.BD3LMConfig(
        vocab_size=11, model_length=16, block_size=block_size, hidden_dim=32, n_heads=2, n_blocks=2, cond_dim=16,
        dropout=0.0,
    )
    cfg.graph, cfg.loss, cfg.p_m = graph, loss, None
    torch.manual_seed(seed)
    return randomize(bd3lm.BD3LM(cfg), seed).eval()


@pytest.mark.parametrize("loss", ["cedd", "subs", "score_entropy"])
def test_absorbing_score_entropy_is_weighted_cross_entropy(loss):
    """§4.1 / §5 item 4 on a real network, absorbing graph, log-linear schedule (σ = -log(1-t), σ' = 1/(1-t)):
    at every masked row, σ'(t) · score entropy of ``log_score`` equals the MDLM weight 1/t times
    -log p_θ(x0) (softmax of the logits with the mask logit at -inf) for the mean parameterisation (cedd, subs);
    for SEDD's scaling log s = f - log(e^σ - 1) - log N (score_entropy) it is (1/t)(-log p_θ(x0) + u - 1 - log u),
    u = mean over clean y of exp(f_y) (the mass penalty)."""
    model = tiny("absorbing", loss)
    cfg = model.config
    m = cfg.mask_index
    graph = make_graph("absorbing", cfg.vocab_size, m)
    gen = torch.Generator().manual_seed(0)
    b = 6
    x0 = torch.randint(0, cfg.vocab_size - 1, (b, cfg.model_length), generator=gen)
    t_seq = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    masked = torch.rand(b, cfg.model_length, generator=gen, dtype=torch.float64) < t_seq[:, None]
    masked[:, 0] = True
    x_t = torch.where(masked, torch.full_like(x0, m), x0)
    with torch.no_grad():
        logits = model(input_ids=x_t).logits  # (B, L, V)
    rows = masked
    f, xr, zr = logits[rows], x_t[rows], x0[rows]
    t_r = t_seq[:, None].expand_as(masked)[rows]
    sigma = -torch.log1p(-t_r)
    rate = 1 / (1 - t_r)
    ls = log_score(model, graph, f, xr, sigma).double()
    got = rate * graph.score_entropy(ls, xr, zr, sigma)
    f64 = f.double()
    clean = [y for y in range(cfg.vocab_size) if y != m]
    lse = torch.logsumexp(f64[:, clean], -1)
    ce = lse - f64.gather(-1, zr[:, None])[:, 0]  # -log p_θ(x0), the mask excluded
    want = ce / t_r
    if loss == "score_entropy":
        u = torch.exp(f64[:, clean]).mean(-1)
        want = want + (u - 1 - torch.log(u)) / t_r
        assert float((u - 1 - torch.log(u)).max()) > 0.05  # a random network is not mass-normalised
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "graph, loss, block_size, schedule",
    [("absorbing", "cedd", 4, "loglinear"), ("absorbing", "score_entropy", 16, "loglinear"),
     ("uniform", "cedd", 16, "geometric")],
)
def test_score_bound_j1_j2_agree_in_expectation(graph, loss, block_size, schedule):
    """§3.4: J1 and J2 estimate the same quantity for any model, so ``score_bound(estimator='j1')`` and ``'j2'``
    agree within 4 standard errors (each row of a batch of copies of one sequence is an independent estimate).
    (Geometric schedule: σ(0) = 1e-4 > 0 makes E[J1] - J2 = -L E H(p_{σ(0)|0}) ≈ -0.018 nats here; see
    test_j1_j2_gap_when_noise_starts_above_zero — far below the Monte-Carlo error.)"""
    model = tiny(graph, loss, block_size)
    gen = torch.Generator().manual_seed(0)
    copies = 16
    x0 = torch.randint(0, 10, (1, 16), generator=gen).repeat(copies, 1)
    j1 = score_bound(model, x0, estimator="j1", num_samples=200, generator=gen, schedule=schedule)
    j2 = score_bound(model, x0, estimator="j2", num_samples=200, generator=gen, schedule=schedule)
    assert j1.dtype == torch.float64 and j1.shape == (copies,) and torch.isfinite(j1).all() and torch.isfinite(j2).all()
    se = math.sqrt(float(j1.var()) / copies + float(j2.var()) / copies)
    assert se > 0
    assert abs(float(j1.mean()) - float(j2.mean())) <= 4 * se, (float(j1.mean()), float(j2.mean()), se)


def test_score_bound_truncated_j1_j2_agree():
    """With ``t_min > 0`` the raw J2 formula differs from J1 in expectation by -L · H(p_{σ(t_min)|0}) (the toy
    identity of test_j1_j2_gap_when_noise_starts_above_zero; absorbing + log-linear: H = H_bin(t_min) per token,
    16 · 0.611 = 9.77 nats at t_min = 0.3); ``score_bound`` subtracts it, so the two estimators agree in
    expectation on any range. Checked against the closed-form gap, which the test can tell from 0."""
    model = tiny("absorbing", "cedd", 16)
    gen = torch.Generator().manual_seed(1)
    copies, t_min = 48, 0.3
    x0 = torch.randint(0, 10, (1, 16), generator=gen).repeat(copies, 1)
    j1 = score_bound(model, x0, estimator="j1", num_samples=64, generator=gen, t_min=t_min)
    j2 = score_bound(model, x0, estimator="j2", num_samples=64, generator=gen, t_min=t_min)
    se = math.sqrt(float(j1.var()) / copies + float(j2.var()) / copies)
    gap = -16 * -(t_min * math.log(t_min) + (1 - t_min) * math.log(1 - t_min))
    assert abs(float(j1.mean() - j2.mean())) <= 4 * se, (float(j1.mean() - j2.mean()), gap, se)
    assert 4 * se < abs(gap) / 5  # the check would see the uncorrected gap


def test_schedules_sigma_and_rate_closed_forms():
    """The (σ, σ') the bounds integrate with (``sigma_and_rate``) against closed forms (§1.5, §5 item 5):
    log-linear σ = -log(1-t), σ' = 1/(1-t), so σ'/(e^σ - 1) = 1/t (the MDLM weight) and e^{σ(t)-σ(s)} - 1 = σ'(t)(t-s);
    geometric σ = σ_min^{1-t} σ_max^t, σ' = σ log(σ_max/σ_min) (σ(0) = 1e-4 > 0); linear σ = -log(1e-3) t."""
    t = torch.tensor([1e-4, 0.01, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    sig, rate = sigma_and_rate(get_schedule("loglinear"), t)
    torch.testing.assert_close(sig, -torch.log1p(-t), rtol=1e-12, atol=0)
    torch.testing.assert_close(rate, 1 / (1 - t), rtol=1e-12, atol=0)
    torch.testing.assert_close(rate / torch.expm1(sig), 1 / t, rtol=1e-10, atol=0)
    s = t / 2
    sig_s, _ = sigma_and_rate(get_schedule("loglinear"), s)
    torch.testing.assert_close(torch.expm1(sig - sig_s), rate * (t - s), rtol=1e-10, atol=0)
    sig, rate = sigma_and_rate(get_schedule("geometric"), t)
    want = 1e-4 ** (1 - t) * 20.0**t
    torch.testing.assert_close(sig, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(rate, want * math.log(20.0 / 1e-4), rtol=1e-10, atol=0)
    sig, rate = sigma_and_rate(get_schedule("linear"), t)
    torch.testing.assert_close(sig, -math.log(1e-3) * t, rtol=1e-10, atol=0)
    torch.testing.assert_close(rate, torch.full_like(t, -math.log(1e-3)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name, p_m", TOY_GRAPHS, ids=TOY_IDS)
def test_prior_constants(name, p_m):
    """``prior_kl(σ)`` = KL(expm(σQ)[:, x0] || uniform over clean) per token for the uniform graph (0 with a mask
    state, where SEDD leaves it out, and at σ = ∞); ``prior_cross_entropy`` = CE(p_∞, π) = log N (uniform), 0 (mask)."""
    graph = make_graph(name, V, MASK, p_m)
    q = hand_q(graph.p_m)
    for sigma in (0.5, 3.0, 8.0):
        col = expm(q, sigma)[:, 0]
        want = kl(col.clip(min=0), np.array([1.0 / N] * N + [0.0])) if not graph.uses_mask else 0.0
        assert graph.prior_kl(sigma) == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert graph.prior_kl(math.inf) == 0.0
    assert graph.prior_cross_entropy() == pytest.approx(0.0 if graph.uses_mask else math.log(N), abs=1e-15)
