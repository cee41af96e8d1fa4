"""Token-level graphs of the score-entropy family (:mod:`bd3lm.graphs`) against independent oracles.

Every expected value here comes from a dense rate matrix built by hand from the definition (SEDD §3 /
/work/shared/research/sedd-mdlm.md §1.2, §3.3), from ``scipy.linalg.expm``, from a Bayes posterior computed from
the dense transition matrix, or from a closed form written in the test — never from the function under test.
All math is float64.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from bd3lm.graphs import Graph, make_graph, score_entropy_k
from bd3lm.score_objectives import check_family


@functools.cache
def _expm_cached(q_bytes: bytes, v: int, t: float) -> np.ndarray:
    return scipy.linalg.expm(t * np.frombuffer(q_bytes).reshape(v, v))


def expm(q: np.ndarray, t: float) -> np.ndarray:
    """``scipy.linalg.expm(t Q)``, memoised: the oracle is called with few distinct (Q, t) and a multi-threaded BLAS
    makes each call slow on shared cores."""
    q = np.ascontiguousarray(q, dtype=np.float64)
    return _expm_cached(q.tobytes(), q.shape[0], float(t)).copy()


# (name, V, mask index, p_m): both vocabulary sizes, the mask first / inside / last.
CASES = [
    ("absorbing", 4, 3, None),
    ("absorbing", 7, 2, None),
    ("uniform", 4, 3, None),
    ("uniform", 7, 0, None),
    ("roulette", 4, 1, 0.5),
    ("roulette", 7, 6, 0.3),
    ("roulette", 7, 3, 0.95),
]
IDS = [f"{n}-V{v}-m{m}" + ("" if p is None else f"-p{p}") for n, v, m, p in CASES]
SIGMAS = [0.03, 0.4, 1.7, 6.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_parts(v: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``Q_abs`` and ``U`` written from their definitions (``Q[a, b]`` = rate of ``b -> a``)."""
    n = v - 1
    q_abs = np.zeros((v, v))
    u = np.zeros((v, v))
    for j in range(v):
        if j == m:
            continue
        q_abs[m, j] = 1.0
        q_abs[j, j] = -1.0
        for i in range(v):
            if i != m:
                u[i, j] = 1.0 / n - (1.0 if i == j else 0.0)
    return q_abs, u


def hand_q(name: str, v: int, m: int, p_m: float | None) -> np.ndarray:
    pm = {"absorbing": 1.0, "uniform": 0.0}.get(name, p_m)
    q_abs, u = hand_parts(v, m)
    return pm * q_abs + (1.0 - pm) * u


def graph_and_q(case) -> tuple[Graph, np.ndarray]:
    name, v, m, p_m = case
    return make_graph(name, v, m, p_m), hand_q(name, v, m, p_m)


def clean_ids(v: int, m: int) -> list[int]:
    return [j for j in range(v) if j != m]


def random_data(v: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """A random full-support distribution over the clean tokens (0 at the mask)."""
    p = rng.dirichlet(np.ones(v - 1))
    out = np.zeros(v)
    out[clean_ids(v, m)] = p
    return out


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


# -- 1. rate and transition matrices ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rate_matrix_matches_definition(case):
    """``rate_matrix()`` = p_m Q_abs + (1 - p_m) U built by hand (§1.2, §3.3); columns sum to 0."""
    g, q = graph_and_q(case)
    got = g.rate_matrix().numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sum(0), 0.0, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_transition_matrix_is_expm(case, sigma):
    """Closed-form ``exp(σQ)`` (columns p(·|x0)) sums to 1 per column and equals ``scipy.linalg.expm(σQ)``
    (§5 item 1)."""
    g, q = graph_and_q(case)
    p = g.transition_matrix(sigma).numpy()
    np.testing.assert_allclose(p.sum(0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p, expm(q, sigma), rtol=0, atol=1e-12)
    assert (p >= 0).all()


@pytest.mark.parametrize("v, m", [(4, 3), (7, 2)])
def test_roulette_endpoints_and_commuting_parts(v, m):
    """Roulette at p_m = 1 is the absorbing graph, at p_m = 0 the uniform graph on the clean tokens (mask isolated);
    ``Q_abs U = U Q_abs = -U`` (§3.3), so ``exp(σQ) = exp(σ p_m Q_abs) exp(σ (1 - p_m) U)``."""
    absorb, uni = make_graph("absorbing", v, m), make_graph("uniform", v, m)
    r1, r0 = make_graph("roulette", v, m, 1.0), make_graph("roulette", v, m, 0.0)
    assert r1.absorbing and r1.uses_mask and not r0.uses_mask and not r0.absorbing
    torch.testing.assert_close(r1.rate_matrix(), absorb.rate_matrix(), rtol=0, atol=1e-15)
    torch.testing.assert_close(r0.rate_matrix(), uni.rate_matrix(), rtol=0, atol=1e-15)
    for sigma in SIGMAS:
        torch.testing.assert_close(r1.transition_matrix(sigma), absorb.transition_matrix(sigma), rtol=0, atol=1e-15)
        torch.testing.assert_close(r0.transition_matrix(sigma), uni.transition_matrix(sigma), rtol=0, atol=1e-15)
    # the uniform graph never reaches the mask: its row and column are those of an isolated state
    q_u = uni.rate_matrix().numpy()
    assert not q_u[m].any() and not q_u[:, m].any()
    q_abs, u = hand_parts(v, m)
    np.testing.assert_allclose(q_abs @ u, u @ q_abs, atol=1e-14)
    np.testing.assert_allclose(q_abs @ u, -u, atol=1e-14)
    for p_m in (0.2, 0.7):
        q = make_graph("roulette", v, m, p_m).rate_matrix().numpy()
        split = expm(q_abs, 1.3 * p_m) @ expm(u, 1.3 * (1 - p_m))
        np.testing.assert_allclose(expm(q, 1.3), split, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rate_into_and_out_rate(case):
    """``rate_into(x)`` is row x of the hand-built Q with 0 at y = x (the weights Q[x_t, y] of score entropy) and
    ``out_rate(x) = -Q[x, x]`` (a clean token leaves at 1 - (1 - p_m)/N, the mask never)."""
    g, q = graph_and_q(case)
    v = g.vocab_size
    x = torch.arange(v)
    want = q.copy()
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(g.rate_into(x, torch.float64).numpy(), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(g.out_rate(x).double().numpy(), -np.diag(q), rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_sample_transition_frequencies(case):
    """``sample_transition`` draws x_t ~ expm(σQ)[:, x0]: empirical frequencies of 60000 draws per x0 lie within
    5 binomial standard errors of the expm column, and a per-token σ broadcasts."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    n = 60000
    gen = torch.Generator().manual_seed(0)
    sigma = 0.8
    dense = expm(q, sigma).clip(min=0)
    for z in clean_ids(v, m)[:3]:
        x = g.sample_transition(torch.full((n,), z), torch.tensor(sigma, dtype=torch.float64), generator=gen)
        freq = torch.bincount(x, minlength=v).double().numpy() / n
        se = np.sqrt(dense[:, z] * (1 - dense[:, z]) / n)
        assert (np.abs(freq - dense[:, z]) <= 5 * se + 1e-12).all(), (freq, dense[:, z])
    sig = torch.tensor([0.0, 50.0], dtype=torch.float64).repeat(200)
    z = clean_ids(v, m)[0]
    x = g.sample_transition(torch.full((400,), z), sig, generator=gen)
    assert (x[0::2] == z).all()  # σ = 0: nothing moves
    if g.uses_mask:
        assert (x[1::2] == m).all()  # σ = 50: e^{-50 p_m} ~ 0 (p_m >= 0.3)
    else:
        assert (x[1::2] != m).all()


# -- 2. conditional ratios and the posterior -> ratio map ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conditional_ratios_match_dense(case):
    """``conditional_ratios`` = p(y|x0) / p(x_t|x0) from the dense ``expm(σQ)`` wherever Q[x_t, y] > 0, 1 at x_t and
    0 where Q[x_t, y] = 0 (the targets of denoising score entropy, SEDD eq. 9)."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    pairs = [(x, x0) for x0 in clean_ids(v, m) for x in range(v)]
    x_t = torch.tensor([p[0] for p in pairs])
    x0 = torch.tensor([p[1] for p in pairs])
    for sigma in SIGMAS:
        dense = expm(q, sigma)
        got = g.conditional_ratios(x_t, x0, torch.tensor(sigma, dtype=torch.float64)).numpy()
        assert got.dtype == np.float64
        checked = 0
        for k, (x, z) in enumerate(pairs):
            assert got[k, x] == 1.0
            for y in range(v):
                if y == x:
                    continue
                if q[x, y] > 0:
                    assert dense[x, z] > 0  # any state with an inflow is reachable from a clean x0
                    want = dense[y, z] / dense[x, z]
                    assert got[k, y] == pytest.approx(want, rel=1e-12, abs=1e-13)
                    checked += 1
                else:
                    assert got[k, y] == 0.0
        assert checked > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_probs_to_ratio_of_exact_posterior_is_marginal_ratio(case):
    """``probs_to_ratio`` fed the exact posterior p(x0 | x_t) (Bayes on the dense matrix, random data distribution)
    reproduces the exact marginal ratios p_t(y) / p_t(x_t) where Q[x_t, y] > 0 (§3.2, §3.3, §5 item 11)."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    rng = np.random.default_rng(11)
    for sigma in (0.05, 0.7, 3.0):
        p0 = random_data(v, m, rng)
        dense = expm(q, sigma)
        pt = dense @ p0
        states = [x for x in range(v) if pt[x] > 0]
        post = np.stack([dense[x, :] * p0 / pt[x] for x in states])  # p(x0 = · | x_t = x)
        np.testing.assert_allclose(post.sum(1), 1.0, atol=1e-14)
        x_t = torch.tensor(states)
        got = g.probs_to_ratio(t64(post), x_t, torch.tensor(sigma, dtype=torch.float64)).numpy()
        for k, x in enumerate(states):
            assert got[k, x] == 1.0
            for y in range(v):
                if y != x and q[x, y] > 0:
                    assert got[k, y] == pytest.approx(pt[y] / pt[x], rel=1e-10)


# -- 3. staggered score and transition row ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_staggered_score_and_transition_row(case):
    """``staggered_score(s, Δσ) = expm(-Δσ Q) @ s`` for arbitrary positive s (§1.6, §5 item 8) and
    ``transition_row(x, Δσ) = expm(Δσ Q)[x, :]`` for every state x."""
    g, q = graph_and_q(case)
    v = g.vocab_size
    rng = np.random.default_rng(3)
    s = rng.uniform(0.05, 5.0, size=(6, v))
    for ds in (1e-3, 0.1, 0.8, 2.5):
        back = expm(q, -ds)
        got = g.staggered_score(t64(s), torch.tensor(ds, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, s @ back.T, rtol=1e-12, atol=1e-12)
        # a per-row Δσ broadcasts
        dss = np.array([1e-3, 0.1, 0.8, 2.5, ds, 0.1])
        got_rows = g.staggered_score(t64(s), t64(dss)).numpy()
        for k in range(len(dss)):
            np.testing.assert_allclose(got_rows[k], expm(q, -dss[k]) @ s[k], rtol=1e-12, atol=1e-12)
        fwd = expm(q, ds)
        rows = g.transition_row(torch.arange(v), torch.tensor(ds, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(rows, fwd, rtol=0, atol=1e-12)


# -- 4. score entropy -----------------------------------------------------------------------------------


def brute_score_entropy(q: np.ndarray, dense: np.ndarray, log_s: np.ndarray, x: int, x0: int) -> float:
    """Σ_{y≠x} Q[x, y] (s_y - r_y log s_y + K(r_y)), r_y = p(y|x0)/p(x|x0), with explicit loops (SEDD eq. 9)."""
    total = 0.0
    for y in range(q.shape[0]):
        if y == x or q[x, y] <= 0:
            continue
        r = dense[y, x0] / dense[x, x0]
        k = r * (math.log(r) - 1.0) if r > 0 else 0.0
        total += q[x, y] * (math.exp(log_s[y]) - r * log_s[y] + k)
    return total


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_score_entropy_brute_force(case):
    """``score_entropy`` equals a loop over y of Q[x_t, y](s_y - r_y log s_y + K(r_y)) from the dense Q and expm(σQ),
    on random (log s, x_t, x0, σ), and is >= 0 (§1.1: each term is r φ(s/r), φ(u) = u - 1 - log u >= 0)."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    rng = np.random.default_rng(5)
    clean = clean_ids(v, m)
    rows = 64
    x0 = rng.choice(clean, size=rows)
    sig = rng.choice([0.02, 0.3, 1.1, 4.0], size=rows)
    log_s = rng.normal(0.0, 1.5, size=(rows, v))
    dense_rows = [expm(q, sig[k]) for k in range(rows)]
    x_t = np.empty(rows, dtype=np.int64)
    for k in range(rows):  # x_t ~ p(·|x0), so every row is a reachable state
        col = dense_rows[k][:, x0[k]].clip(min=0)  # expm leaves ±1e-17 where p is exactly 0
        x_t[k] = rng.choice(v, p=col / col.sum())
    got = g.score_entropy(t64(log_s), torch.tensor(x_t), torch.tensor(x0), t64(sig)).numpy()
    assert got.dtype == np.float64
    for k in range(rows):
        dense = dense_rows[k]
        want = brute_score_entropy(q, dense, log_s[k], int(x_t[k]), int(x0[k]))
        assert got[k] == pytest.approx(want, rel=1e-11, abs=1e-12)
    assert (got >= 0).all()
    # without K: the same loop minus Σ Q K(r)
    got_nk = g.score_entropy_without_k(t64(log_s), torch.tensor(x_t), torch.tensor(x0), t64(sig)).numpy()
    for k in range(rows):
        dense = dense_rows[k]
        x, z = int(x_t[k]), int(x0[k])
        ks = sum(q[x, y] * (dense[y, z] / dense[x, z]) * (math.log(dense[y, z] / dense[x, z]) - 1)
                 for y in range(v) if y != x and q[x, y] > 0 and dense[y, z] > 0)
        assert got_nk[k] == pytest.approx(got[k] - ks, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_score_entropy_zero_at_conditional_ratios(case):
    """Score entropy is 0 (<= 1e-12) at log s = log r (the dense conditional ratios) and equals
    Q[x_t, y] r φ(e^δ) > 0 when one read entry is perturbed by δ in log space (§5 item 2)."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    for sigma in (0.1, 1.0, 4.0):
        dense = expm(q, sigma)
        for z in clean_ids(v, m):
            for x in range(v):
                read = [y for y in range(v) if y != x and q[x, y] > 0]
                if dense[x, z] == 0 or not read:
                    continue
                # closed-form zeros (absorbing: p(y|x0) = 0 for a clean y != x0) are exact zeros, not expm noise
                r = np.array([dense[y, z] / dense[x, z] if dense[y, z] > 1e-14 else 0.0 for y in range(v)])
                # s = r on the read entries: log r, and -800 where r = 0 (exp(-800) is exactly 0.0 in float64; see
                # test_score_entropy_at_zero_ratio_with_log_zero for log s = -inf); unread entries are arbitrary
                log_s = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), -800.0)
                log_s[[y for y in range(v) if y not in read]] = 7.0
                args = (torch.tensor([x]), torch.tensor([z]), torch.tensor(sigma, dtype=torch.float64))
                zero = float(g.score_entropy(t64(log_s[None]), *args))
                assert abs(zero) <= 1e-12
                for y in read:
                    for delta in (-0.3, 0.2):
                        bumped = log_s.copy()
                        if r[y] > 0:
                            bumped[y] += delta
                            want = q[x, y] * r[y] * (math.exp(delta) - 1 - delta)
                        else:  # r = 0: the term is Q[x, y] s_y
                            bumped[y] = math.log(0.5 + delta)
                            want = q[x, y] * (0.5 + delta)
                        got = float(g.score_entropy(t64(bumped[None]), *args))
                        assert got > 0
                        assert got == pytest.approx(want, rel=1e-9, abs=1e-13)


def test_score_entropy_at_zero_ratio_with_log_zero():
    """Absorbing graph, masked x_t: r_y = p(y|x0)/p(m|x0) = 0 for clean y != x0. With log s = log r (so -inf there)
    the terms are s_y - 0 * log s_y + K(0) = 0 (0 log 0 = 0), so score entropy is 0 (docstring: "= 0 iff s = r")."""
    g = make_graph("absorbing", 4, 3)
    x_t, x0, sigma = torch.tensor([3]), torch.tensor([0]), torch.tensor(0.5, dtype=torch.float64)
    r = torch.tensor([[1 / math.expm1(0.5), 0.0, 0.0, 1.0]], dtype=torch.float64)  # b/a = 0, c/a = 1/(e^σ-1)
    torch.testing.assert_close(g.conditional_ratios(x_t, x0, sigma), r, rtol=1e-14, atol=0)
    got = g.score_entropy(torch.log(r), x_t, x0, sigma)
    assert torch.isfinite(got).all() and abs(float(got)) <= 1e-12


def test_score_entropy_k_closed_form():
    """``K(r) = r (log r - 1)``, ``K(0) = 0``, ``K(1) = -1`` (SEDD Def. 3.1)."""
    r = torch.tensor([0.0, 1.0, 0.5, 3.0, 1e-300], dtype=torch.float64)
    want = [0.0, -1.0, 0.5 * (math.log(0.5) - 1), 3 * (math.log(3) - 1), 1e-300 * (math.log(1e-300) - 1)]
    np.testing.assert_allclose(score_entropy_k(r).numpy(), want, rtol=1e-14, atol=0)


# -- 5. samplers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v, m", [(4, 3), (7, 2)])
def test_absorbing_loglinear_euler_analytic_ddpm_agree(v, m):
    """Absorbing + log-linear (σ(t) = -log(1-t), σ'(t) = 1/(1-t)), mean-parameterised score s = p / (e^σ - 1):
    Euler (Δt σ'(t)), analytic (Δσ = σ(t) - σ(t-Δt)) and MDLM's DDPM step (reveal w.p. (α_s-α_t)/(1-α_t) = Δt/t,
    token from p) are the same distribution (§4.2, §5 item 6); a clean token never moves."""
    g = make_graph("absorbing", v, m)
    rng = np.random.default_rng(7)
    clean = clean_ids(v, m)
    for t, dt in [(0.9, 0.1), (0.5, 0.05), (0.2, 0.01), (0.3, 0.3), (1e-3, 5e-4)]:
        sig_t = -math.log1p(-t)
        sig_s = -math.log1p(-(t - dt))
        rate = 1.0 / (1.0 - t)
        p = random_data(v, m, rng)
        score = p / math.expm1(sig_t)
        score[m] = 1.0
        x = torch.tensor([m])
        euler = g.euler_probs(t64(score[None]), x, torch.tensor(dt * rate, dtype=torch.float64)).numpy()[0]
        analytic = g.analytic_probs(t64(score[None]), x, torch.tensor(sig_t - sig_s, dtype=torch.float64)).numpy()[0]
        reveal = ((1 - (t - dt)) - (1 - t)) / (1 - (1 - t))  # (α_s - α_t) / (1 - α_t), α = 1 - t
        assert reveal == pytest.approx(dt / t, rel=1e-12)
        ddpm = np.zeros(v)
        ddpm[clean] = reveal * p[clean]
        ddpm[m] = 1 - reveal
        np.testing.assert_allclose(euler, ddpm, rtol=0, atol=1e-12)
        np.testing.assert_allclose(analytic, ddpm, rtol=0, atol=1e-12)
        # clean positions are frozen under both steps
        for c in clean:
            s_c = np.ones(v) * 0.7
            s_c[c] = 1.0
            onehot = np.eye(v)[c]
            e = g.euler_probs(t64(s_c[None]), torch.tensor([c]), torch.tensor(dt * rate, dtype=torch.float64))
            a = g.analytic_probs(t64(s_c[None]), torch.tensor([c]), torch.tensor(sig_t - sig_s, dtype=torch.float64))
            np.testing.assert_allclose(e.numpy()[0], onehot, atol=1e-15)
            np.testing.assert_allclose(a.numpy()[0], onehot, atol=1e-15)


@pytest.mark.parametrize("v, m", [(4, 3), (7, 0)])
def test_uniform_euler_vs_analytic_second_order(v, m):
    """Uniform graph: Euler and analytic steps differ by O(Δσ²) per step — the max |difference| over y shrinks by
    ≈ 4 per halving of Δσ (§4.2, §5 item 17)."""
    g = make_graph("uniform", v, m)
    q = hand_q("uniform", v, m, None)
    rng = np.random.default_rng(2)
    p0 = random_data(v, m, rng)
    pt = expm(q, 1.0) @ p0
    for x in clean_ids(v, m):
        score = np.where(np.arange(v) == m, 0.0, pt / pt[x])  # exact marginal ratios at σ = 1
        diffs = []
        for ds in (0.2, 0.1, 0.05, 0.025):
            h = torch.tensor(ds, dtype=torch.float64)
            e = g.euler_probs(t64(score[None]), torch.tensor([x]), h).numpy()[0]
            a = g.analytic_probs(t64(score[None]), torch.tensor([x]), h).numpy()[0]
            assert e[m] == 0.0 and a[m] == 0.0
            diffs.append(np.abs(e - a).max())
        ratios = [diffs[k] / diffs[k + 1] for k in range(len(diffs) - 1)]
        assert all(3.5 <= r <= 4.5 for r in ratios), (diffs, ratios)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_analytic_step_is_bayes_posterior(case):
    """With the exact ratios s_y = p_t(y)/p_t(x) and one token, the analytic (Tweedie τ-leaping) step is the Bayes
    posterior P(x_s = y | x_t = x) = expm(ΔσQ)[x, y] p_s(y) / p_t(x) (§1.6, §5 item 7) — both with the full ratio
    vector and with the sampler's view (probs_to_ratio of the exact posterior, 0 where Q[x, y] = 0)."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    rng = np.random.default_rng(13)
    for sig_s, ds in [(0.2, 0.05), (1.0, 0.4), (2.5, 1.5)]:
        p0 = random_data(v, m, rng)
        ps = expm(q, sig_s) @ p0
        step = expm(q, ds)
        pt = step @ ps
        sig_t = sig_s + ds
        dense_t = expm(q, sig_t)
        for x in range(v):
            if pt[x] <= 0:
                continue
            want = step[x, :] * ps / pt[x]
            assert want.sum() == pytest.approx(1.0, abs=1e-13)
            full = pt / pt[x]
            got = g.analytic_probs(t64(full[None]), torch.tensor([x]), torch.tensor(ds, dtype=torch.float64))
            np.testing.assert_allclose(got.numpy()[0], want, rtol=0, atol=1e-12)
            post0 = dense_t[x, :] * p0 / pt[x]
            s_view = g.probs_to_ratio(t64(post0[None]), torch.tensor([x]), torch.tensor(sig_t, dtype=torch.float64))
            got2 = g.analytic_probs(s_view, torch.tensor([x]), torch.tensor(ds, dtype=torch.float64))
            np.testing.assert_allclose(got2.numpy()[0], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_analytic_step_normalisation_for_any_score(case):
    """For arbitrary positive s (s_x = 1), the unnormalised analytic weights [expm(-ΔσQ)s]_y expm(ΔσQ)[x, y] sum to
    s_x = 1 (§1.6 "automatic normalisation"), so ``analytic_probs`` returns them unchanged; it always sums to 1."""
    g, q = graph_and_q(case)
    v = g.vocab_size
    rng = np.random.default_rng(17)
    ds = 0.02
    fwd, back = expm(q, ds), expm(q, -ds)
    for x in range(v):
        for _ in range(3):
            s = rng.uniform(0.5, 2.0, size=v)
            s[x] = 1.0
            w = (back @ s) * fwd[x, :]
            assert w.sum() == pytest.approx(1.0, abs=1e-13)
            assert (w >= 0).all()
            got = g.analytic_probs(t64(s[None]), torch.tensor([x]), torch.tensor(ds, dtype=torch.float64)).numpy()[0]
            np.testing.assert_allclose(got, w, rtol=0, atol=1e-13)
    s_big = t64(rng.uniform(0.01, 50.0, size=(32, v)))
    xs = torch.tensor(rng.integers(0, v, size=32))
    s_big = s_big.scatter(-1, xs[:, None], 1.0)
    out = g.analytic_probs(s_big, xs, torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(out.sum(-1), torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (out >= 0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_denoise_probs_is_posterior_and_never_mask(case):
    """``denoise_probs`` (analytic step from σ to 0, mask dropped) equals the exact posterior p(x0 | x_t) from the
    dense matrix for exact ratios, and never puts mass on the mask, for any positive s (§1.6 "Denoise")."""
    g, q = graph_and_q(case)
    v, m = g.vocab_size, g.mask_index
    rng = np.random.default_rng(19)
    for sigma in (1e-3, 0.3, 2.0):
        p0 = random_data(v, m, rng)
        dense = expm(q, sigma)
        pt = dense @ p0
        for x in range(v):
            if pt[x] <= 0:
                continue
            post = dense[x, :] * p0 / pt[x]
            got = g.denoise_probs(t64((pt / pt[x])[None]), torch.tensor([x]), torch.tensor(sigma, dtype=torch.float64))
            np.testing.assert_allclose(got.numpy()[0], post, rtol=0, atol=1e-10)
            assert got[0, m] == 0.0
        s = t64(rng.uniform(0.01, 10.0, size=(20, v)))
        reachable = [x for x in range(v) if pt[x] > 0]  # the uniform graph's mask state is never a valid x_t
        xs = torch.tensor(rng.choice(reachable, size=20))
        out = g.denoise_probs(s.scatter(-1, xs[:, None], 1.0), xs, torch.tensor(sigma, dtype=torch.float64))
        assert (out[:, m] == 0).all() and (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)


# -- 6. bad input -------------------------------------------------------------------------------------------


def _one_line_value_error(fn, *args, match: str) -> None:
    with pytest.raises(ValueError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg, msg


def test_bad_graph_arguments():
    """Unknown graph names and roulette p_m outside [0, 1] (or missing) raise one-line ValueErrors naming the value."""
    _one_line_value_error(Graph, "absorb", 5, 4, match="'absorb'")
    _one_line_value_error(make_graph, "Uniform", 5, 4, match="'Uniform'")
    for bad in (-0.1, 1.5, None, float("nan"), True):
        _one_line_value_error(make_graph, "roulette", 5, 4, bad, match=repr(bad))
    _one_line_value_error(Graph, "uniform", 2, 1, match="2")
    _one_line_value_error(Graph, "absorbing", 5, 5, match="5")
    # the endpoints are allowed; p_m is ignored outside roulette
    assert make_graph("roulette", 5, 4, 0).p_m == 0.0 and make_graph("roulette", 5, 4, 1).p_m == 1.0
    assert make_graph("absorbing", 5, 4, 1.5).p_m == 1.0


def test_check_family_rejects_bad_pairs():
    """``check_family`` rejects an unknown graph, an unknown loss, (uniform, subs), (roulette, subs) and a bad p_m
    with one-line messages naming the value, and accepts the valid pairs."""
    bad_calls = [(("absorbing", "sedd"), "'sedd'"), (("grid", "cedd"), "'grid'"), (("uniform", "subs"), "'uniform'"),
                 (("roulette", "subs", 0.5), "'roulette'")]
    bad_calls += [(("roulette", "cedd", bad), repr(bad)) for bad in (-0.1, 1.5, None)]
    for args, match in bad_calls:
        with pytest.raises(ValueError) as info:
            check_family(*args)
        assert "\n" not in str(info.value) and match in str(info.value)
    valid = [("absorbing", "subs", None), ("absorbing", "score_entropy", None), ("uniform", "cedd", None),
             ("roulette", "score_entropy", 0.5)]
    assert [check_family(*args) for args in valid] == [None] * len(valid)
