"""Token-level forward processes of the score-entropy family: the absorbing, uniform and roulette graphs.

A graph is a rate matrix ``Q`` over the model's vocabulary of ``V`` states, ``N = V - 1`` clean tokens and the
mask ``m`` (SEDD convention, Lou et al. 2024 §3: ``Q[a, b]`` is the rate of jumping ``b -> a``, columns sum to 0,
``p_{t|0} = exp(σ(t) Q)[:, x_0]`` with σ the total noise). All three are one family (Haxholli et al. 2025,
"roulette")::

    Q = p_m Q_abs + (1 - p_m) U,   Q_abs[m, j] = 1, Q_abs[j, j] = -1,   U = (1/N) 1 1ᵀ - I on the clean tokens,

with ``p_m = 1`` the absorbing graph (MDLM, SEDD-absorb), ``p_m = 0`` the uniform graph on the clean tokens (the
mask state is then never reached; it stays in the tensors with probability 0), and ``0 < p_m < 1`` roulette.
``Q_abs U = U Q_abs = -U``: the parts commute, so with ``e_m = exp(-σ p_m)``, ``e_g = exp(-σ (1 - p_m))``
the transition probabilities from a clean ``x_0`` are (closed forms of ``exp(σQ)``, valid for any finite real σ;
the ratio maps read σ > 0)::

    a = P(m | x_0) = 1 - e_m,   c = P(x_0 | x_0) = e_m (e_g + (1 - e_g) / N),   b = P(y | x_0) = e_m (1 - e_g) / N,

and the mask stays the mask. Everything a loss or a sampler needs is expressed through ``a``, ``b``, ``c``:
conditional ratios ``p(y|x_0)/p(x_t|x_0)`` (eq. of the denoising score entropy), the map from a predicted clean-token
distribution to ratios (Haxholli et al., "probabilities to score"), the staggered score ``exp(-ΔσQ) s`` and the
transition row ``exp(ΔσQ)[x, ·]`` of SEDD's analytic (Tweedie τ-leaping) step, and the Euler reverse rates.

Tensors of scores/ratios are (..., V) with the last axis the vocabulary; ``x`` are (...) token ids; σ broadcasts
against ``x``. Math is done in the dtype of the inputs: pass float64 where exactness matters (the samplers do).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GRAPHS", "LOSSES", "Graph", "check_family", "make_graph", "score_entropy_k"]

GRAPHS = ("absorbing", "uniform", "roulette")
#: Output parameterisations / training losses (see :mod:`bd3lm.score_objectives`).
LOSSES = ("subs", "score_entropy", "cedd")


def score_entropy_k(r: Tensor) -> Tensor:
    """``K(r) = r (log r - 1)`` with ``K(0) = 0``: the constant that makes score entropy 0 at the optimum
    (SEDD Def. 3.1)."""
    return torch.where(r > 0, r * (torch.log(r.clamp_min(torch.finfo(r.dtype).tiny)) - 1), torch.zeros_like(r))


class Graph:
    """The rate matrix ``p_m Q_abs + (1 - p_m) U`` over ``vocab_size`` states with the mask at ``mask_index``.

    Args:
        name: ``absorbing`` (p_m = 1), ``uniform`` (p_m = 0) or ``roulette`` (``p_m`` in [0, 1]).
        vocab_size: V, the model's vocabulary including the mask token.
        mask_index: id of the mask state ``m``.
        p_m: roulette's probability of a jump going to the mask (ignored by the other two).
    """

    def __init__(self, name: str, vocab_size: int, mask_index: int, p_m: float | None = None) -> None:
        if name not in GRAPHS:
            raise ValueError(f"unknown graph {name!r}; expected one of {', '.join(GRAPHS)}")
        if name == "roulette":
            if p_m is None or isinstance(p_m, bool) or not isinstance(p_m, (int, float)) or not 0.0 <= p_m <= 1.0:
                raise ValueError(f"roulette p_m must be a number in [0, 1]; got {p_m!r}")
            p_m = float(p_m)
        else:
            p_m = 1.0 if name == "absorbing" else 0.0
        if vocab_size < 3 or not 0 <= mask_index < vocab_size:
            raise ValueError(f"a graph needs vocab_size >= 3 and a mask id inside it; got {vocab_size}, {mask_index}")
        self.name, self.p_m, self.g = name, p_m, 1.0 - p_m
        self.vocab_size, self.mask_index = int(vocab_size), int(mask_index)
        self.n_clean = self.vocab_size - 1

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, V={self.vocab_size}, p_m={self.p_m:g})"

    @property
    def absorbing(self) -> bool:
        """True when clean tokens never change into other clean tokens (p_m = 1): the SUBS/MDLM case."""
        return self.g == 0.0

    @property
    def uses_mask(self) -> bool:
        """True when the forward process reaches the mask state (p_m > 0)."""
        return self.p_m > 0.0

    # -- the matrix itself (dense; small vocabularies, tests and enumeration) --------------------------------

    def rate_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense ``Q`` (V, V), ``Q[a, b]`` = rate of ``b -> a``."""
        v, m, n = self.vocab_size, self.mask_index, self.n_clean
        q = torch.zeros(v, v, dtype=dtype)
        clean = torch.ones(v, dtype=torch.bool)
        clean[m] = False
        q[m, clean] = self.p_m
        block = torch.full((n, n), self.g / n, dtype=dtype) - self.g * torch.eye(n, dtype=dtype)
        q[clean.nonzero()[:, 0, None], clean.nonzero()[:, 0]] = block
        q[clean, clean] = q[clean, clean] - self.p_m
        return q

    def transition_matrix(self, sigma: float, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense ``exp(σQ)`` (V, V) from the closed forms (column ``x_0`` = ``p(· | x_0)``)."""
        s = torch.tensor(float(sigma), dtype=dtype)
        a, b, c = self.abc(s)
        v, m = self.vocab_size, self.mask_index
        p = torch.full((v, v), float(b), dtype=dtype)
        p.diagonal().fill_(float(c))
        p[m, :] = a
        p[:, m] = 0.0
        p[m, m] = 1.0
        return p

    # -- closed forms --------------------------------------------------------------------------------------

    def abc(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, b, c)`` = P(m | x_0), P(y | x_0) for a clean ``y != x_0``, P(x_0 | x_0) at total noise σ."""
        n = self.n_clean
        e_m = torch.exp(-sigma * self.p_m)
        one_minus_eg = -torch.expm1(-sigma * self.g)
        a = -torch.expm1(-sigma * self.p_m)
        b = e_m * one_minus_eg / n
        c = e_m * (1 - one_minus_eg) + b
        return a, b, c

    def _ratio_parts(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(b/a, c/a, b/c)`` computed without cancellation (only their finite uses are ever read)."""
        n = self.n_clean
        em1_g = torch.expm1(sigma * self.g)  # e^{σg} - 1
        em1_m = torch.expm1(sigma * self.p_m)  # e^{σ p_m} - 1
        # b/a = (1 - e_g) e_m / (N (1 - e_m)) = (e^{σg} - 1) / (N e^{σg} (e^{σ p_m} - 1))
        b_over_a = em1_g / (n * (em1_g + 1) * em1_m)
        # c/a = e_m (e_g + (1 - e_g)/N) / (1 - e_m) = (1 + (e^{σg} - 1)/N) / (e^{σg} (e^{σ p_m} - 1))
        c_over_a = (1 + em1_g / n) / ((em1_g + 1) * em1_m)
        # b/c = (1 - e_g) / (N e_g + 1 - e_g) = (e^{σg} - 1) / (N + e^{σg} - 1)
        b_over_c = em1_g / (n + em1_g)
        return b_over_a, c_over_a, b_over_c

    def _clean(self, like: Tensor) -> Tensor:
        """Boolean (V,) with False at the mask state."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool, device=like.device)
        keep[self.mask_index] = False
        return keep

    def rate_into(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Q[x, y]`` for every ``y`` (..., V), zero at ``y = x``: the forward rates into the current state, the
        weights of score entropy and of the reverse rates ``σ' Q[x, y] s_y``."""
        v, m = self.vocab_size, self.mask_index
        w = torch.zeros(*x.shape, v, dtype=dtype, device=x.device)
        is_m = (x == m)[..., None]
        clean = self._clean(x)
        w = torch.where(is_m & clean, torch.tensor(self.p_m, dtype=dtype, device=x.device), w)
        w = torch.where(~is_m & clean, torch.tensor(self.g / self.n_clean, dtype=dtype, device=x.device), w)
        return w.scatter(-1, x[..., None], 0.0)

    def out_rate(self, x: Tensor) -> Tensor:
        """``-Q[x, x]``, the total rate of leaving ``x``: ``1 - g/N`` for a clean token, 0 for the mask."""
        return torch.where(x == self.mask_index, 0.0, 1.0 - self.g / self.n_clean)

    def conditional_ratios(self, x_t: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """``p_{t|0}(y | x_0) / p_{t|0}(x_t | x_0)`` (..., V) wherever ``Q[x_t, y] > 0`` (0 elsewhere; 1 at ``x_t``).

        The targets of denoising score entropy (SEDD eq. 9)."""
        dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x_t.device).expand(x_t.shape)[..., None]
        b_a, c_a, b_c = self._ratio_parts(sigma)
        w = self.rate_into(x_t, dtype)
        is_m = (x_t == self.mask_index)[..., None]
        same = (x_t == x0)[..., None]
        at_x0 = torch.nn.functional.one_hot(x0, self.vocab_size).bool()
        masked_r = torch.where(at_x0, c_a, b_a)
        clean_same_r = b_c.expand_as(w)
        clean_diff_r = torch.where(at_x0, 1 / b_c.expand_as(w), torch.ones_like(w))
        r = torch.where(is_m, masked_r, torch.where(same, clean_same_r, clean_diff_r))
        r = torch.where(w > 0, r, torch.zeros_like(r))
        return r.scatter(-1, x_t[..., None], 1.0)

    def probs_to_ratio(self, probs: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        """Ratios ``s_y = p_t(x^{i←y}) / p_t(x)`` from a clean-token distribution ``probs`` = p(x_0^i | x_t) (...,V):
        ``s_y = E_{x_0 ~ probs}[p(y|x_0) / p(x_t|x_0)]`` (Haxholli et al. 2025; exact at the true posterior).

        - masked ``x_t``: ``s_y = b/a + probs_y (c/a - b/a)`` for clean ``y``;
        - clean ``x_t = x``: ``s_y = 1 + probs_y (c/b - 1) + probs_x (b/c - 1)`` for clean ``y != x``.
        ``s`` is 1 at ``y = x_t`` and 0 where ``Q[x_t, y] = 0`` (those entries are never read)."""
        dtype = probs.dtype
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x_t.device).expand(x_t.shape)[..., None]
        b_a, c_a, b_c = self._ratio_parts(sigma)
        w = self.rate_into(x_t, dtype)
        is_m = (x_t == self.mask_index)[..., None]
        masked_s = b_a + probs * (c_a - b_a)
        if self.absorbing:
            clean_s = torch.zeros_like(probs)
        else:
            p_x = probs.gather(-1, x_t[..., None])
            clean_s = 1 + probs * (1 / b_c - 1) + p_x * (b_c - 1)
        s = torch.where(is_m, masked_s, clean_s)
        s = torch.where(w > 0, s, torch.zeros_like(s))
        return s.scatter(-1, x_t[..., None], 1.0)

    def score_entropy(
        self, log_score: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor, with_k: bool = True
    ) -> Tensor:
        """Denoising score entropy per position (...) with the constant (SEDD eq. 9 with ``K``)::

            Σ_{y ≠ x_t} Q[x_t, y] (s_y - r_y log s_y + K(r_y)),   r_y = p(y | x_0) / p(x_t | x_0),

        ``>= 0``, ``= 0`` iff ``s = r`` on the support of ``Q[x_t, ·]``. ``log_score`` (..., V); only its entries
        with ``Q[x_t, y] > 0`` are read. Multiply by ``σ'(t)`` and integrate over t for the likelihood bound.
        ``with_k=False`` leaves out ``K(r_y)``: the integrand of the J2 bound (Haxholli et al. 2025)."""
        # Closed form per case (the ratios take at most three values per row), so that only two passes over the
        # vocabulary are needed: S = Σ s_y and Λ = Σ log s_y over the clean y != x_t.
        #   masked x_t:       p_m [S - (b/a)(Λ - l_0) - (c/a) l_0 + (N-1) K(b/a) + K(c/a)]
        #   clean x_t = x_0:  (g/N) [S - (b/c) Λ + (N-1) K(b/c)]
        #   clean x_t != x_0: (g/N) [S - (Λ - l_0) - (c/b) l_0 + (N-2) K(1) + K(c/b)],   l_0 = log s_{x_0}
        dtype, n, m = log_score.dtype, self.n_clean, self.mask_index
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x_t.device).expand(x_t.shape)
        b_a, c_a, b_c = self._ratio_parts(sigma)
        c_b = 1 / b_c
        excluded = torch.zeros_like(log_score, dtype=torch.bool).scatter(-1, x_t[..., None], True)
        excluded[..., m] = True
        big_s = torch.exp(log_score.masked_fill(excluded, float("-inf"))).sum(-1)
        lam = log_score.masked_fill(excluded, 0.0).sum(-1)
        l0 = log_score.gather(-1, x0[..., None])[..., 0]

        def times(coef: Tensor, value: Tensor) -> Tensor:  # coef * value with 0 * anything = 0 (and no inf/NaN)
            ok = (coef > 0) & torch.isfinite(coef)
            return torch.where(ok, torch.where(ok, coef, 0.0) * value, 0.0)

        def k(r: Tensor) -> Tensor:
            return score_entropy_k(torch.where(torch.isfinite(r), r, 0.0)) if with_k else torch.zeros_like(r)

        masked = big_s - times(b_a, lam - l0) - times(c_a, l0) + (n - 1) * k(b_a) + k(c_a)
        same = big_s - times(b_c, lam) + (n - 1) * k(b_c)
        diff = big_s - (lam - l0) - times(c_b, l0) + ((n - 2) * -1.0 if with_k else 0.0) + k(c_b)
        is_m = x_t == m
        zero = torch.zeros_like(big_s)
        out_m = self.p_m * masked if self.p_m > 0 else zero
        out_c = (self.g / n) * torch.where(x_t == x0, same, diff) if self.g > 0 else zero
        return torch.where(is_m, out_m, out_c)

    def score_entropy_without_k(self, log_score: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """``Σ_{y ≠ x_t} Q[x_t, y] (s_y - r_y log s_y)``: :meth:`score_entropy` without ``K``, J2's integrand."""
        return self.score_entropy(log_score, x_t, x0, sigma, with_k=False)

    # -- forward sampling ------------------------------------------------------------------------------------

    def _uniform_clean(self, shape: torch.Size, device, generator: torch.Generator | None) -> Tensor:
        r = torch.randint(0, self.n_clean, shape, device=device, generator=generator)
        return r + (r >= self.mask_index).long()

    def sample_transition(self, x0: Tensor, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x_t ~ p_{t|0}(· | x_0)`` per token: resample uniformly w.p. ``1 - e_g`` (possibly to itself), then mask
        w.p. ``1 - e_m`` (the two parts commute, so the order is free). ``sigma`` broadcasts against ``x0``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x0.device).expand(x0.shape)
        x = x0
        if self.g > 0:
            move = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
            resample = move < -torch.expm1(-sigma * self.g)
            x = torch.where(resample, self._uniform_clean(x0.shape, x0.device, generator), x)
        if self.p_m > 0:
            drop = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
            x = torch.where(drop < -torch.expm1(-sigma * self.p_m), torch.full_like(x, self.mask_index), x)
        return x

    def sample_limit(self, shape: tuple[int, ...], device=None, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the σ → ∞ limit: all mask when ``p_m > 0``, uniform clean tokens when ``p_m = 0``."""
        if self.uses_mask:
            return torch.full(shape, self.mask_index, dtype=torch.long, device=device)
        return self._uniform_clean(torch.Size(shape), device, generator)

    # -- reverse steps (SEDD §4.1) -------------------------------------------------------------------------

    def staggered_score(self, score: Tensor, dsigma: Tensor) -> Tensor:
        """``exp(-Δσ Q) s`` (..., V) in closed form: ``(c' - b') s_y + b' Σ_clean s`` at a clean ``y`` and
        ``a' Σ_clean s + s_m`` at the mask, primes at ``-Δσ``."""
        dsigma = torch.as_tensor(dsigma, dtype=score.dtype, device=score.device)
        if dsigma.dim():
            dsigma = dsigma[..., None]
        a, b, c = self.abc(-dsigma)
        clean = self._clean(score)
        s_c = torch.where(clean, score, torch.zeros_like(score))
        total = s_c.sum(-1, keepdim=True)
        out = (c - b) * s_c + b * total
        s_m = score[..., self.mask_index : self.mask_index + 1]
        return torch.where(clean, out, a * total + s_m)

    def transition_row(self, x: Tensor, dsigma: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """``exp(Δσ Q)[x, y]`` = P(x_t = x | x_s = y) for every ``y`` (..., V)."""
        dsigma = torch.as_tensor(dsigma, dtype=dtype, device=x.device).expand(x.shape)[..., None]
        a, b, c = self.abc(dsigma)
        clean = self._clean(x)
        is_m = (x == self.mask_index)[..., None]
        at_x = torch.nn.functional.one_hot(x, self.vocab_size).bool()
        from_clean = torch.where(at_x, c, b.expand(*x.shape, self.vocab_size))
        from_clean = torch.where(clean, from_clean, torch.zeros_like(from_clean))
        row = torch.where(is_m, a.expand(*x.shape, self.vocab_size), from_clean)
        return torch.where(is_m & ~clean, torch.ones_like(row), row)

    def analytic_probs(self, score: Tensor, x: Tensor, dsigma: Tensor) -> Tensor:
        """SEDD's analytic (Tweedie τ-leaping) step ``p(x_s = y | x_t = x) ∝ [exp(-ΔσQ) s]_y exp(ΔσQ)[x, y]``
        (..., V), normalised; exact for one token with exact ratios (sums to ``s_x = 1`` for any ``s``)."""
        w = self.staggered_score(score, dsigma) * self.transition_row(x, dsigma, score.dtype)
        return normalise(w)

    def euler_probs(self, score: Tensor, x: Tensor, sigma_rate_dt: Tensor) -> Tensor:
        """SEDD's Euler step ``δ_{x} + Δt σ'(t) R(y)``, ``R(y) = Q[x, y] s_y`` for ``y != x`` and ``R(x) = -Σ``,
        with ``sigma_rate_dt = Δt σ'(t)`` (...) — clipped at 0 and renormalised (SEDD does not clip)."""
        h = torch.as_tensor(sigma_rate_dt, dtype=score.dtype, device=score.device).expand(x.shape)[..., None]
        jump = h * self.rate_into(x, score.dtype) * score
        stay = 1 - jump.sum(-1, keepdim=True)
        return normalise(jump.scatter(-1, x[..., None], stay))

    def denoise_probs(self, score: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """SEDD's final denoising step: the analytic step from σ to 0 with the mask column dropped."""
        p = self.staggered_score(score, sigma) * self.transition_row(x, sigma, score.dtype)
        p[..., self.mask_index] = 0.0
        return normalise(p)

    # -- bound constants (Haxholli et al. 2025, the J2 bound) ------------------------------------------------

    def outflow_integral(self, sigma_0: float, sigma_1: float) -> float:
        """``∫ σ'(t) E_{p_t}[-Q[x_t, x_t]] dt`` per token from total noise ``sigma_0`` to ``sigma_1`` (a clean token
        leaves at rate ``1 - g/N`` and is still clean with probability ``e^{-σ p_m}``)."""
        rate = 1.0 - self.g / self.n_clean
        if self.p_m == 0.0:
            return rate * (sigma_1 - sigma_0)
        end = 0.0 if math.isinf(sigma_1) else math.exp(-sigma_1 * self.p_m)
        return rate * (math.exp(-sigma_0 * self.p_m) - end) / self.p_m

    def conditional_entropy(self, sigma: float) -> float:
        """``H(p_{σ|0}(· | x_0))`` per token (equal for every clean ``x_0``): ``-a log a - c log c - (N-1) b log b``."""
        if sigma <= 0.0:
            return 0.0
        a, b, c = (float(v) for v in self.abc(torch.tensor(float(sigma), dtype=torch.float64)))
        return -sum(w * p * math.log(p) for w, p in ((1, a), (1, c), (self.n_clean - 1, b)) if p > 0)

    def prior_cross_entropy(self) -> float:
        """``CE(p_T, π)`` per token for the limit π at σ_T = ∞: ``log N`` for uniform, 0 when ``p_T = π``."""
        return math.log(self.n_clean) if not self.uses_mask else 0.0

    def prior_kl(self, sigma_1: float) -> float:
        """``KL(p_{T|0} || π)`` per token at total noise ``sigma_1`` (0 at σ = ∞). Uniform: ``log N - H(c, b, …)``;
        with a mask state the limit is a point mass, so the term is 0 only at σ = ∞ and infinite otherwise; it is
        left out there, as SEDD does (the clean mass it stands for is ``e^{-σ p_m}``, tiny unless ``p_m`` is)."""
        if math.isinf(sigma_1) or self.uses_mask:
            return 0.0
        _, b, c = (float(v) for v in self.abc(torch.tensor(sigma_1, dtype=torch.float64)))
        n = self.n_clean
        ent = -(c * math.log(c) if c > 0 else 0.0) - ((n - 1) * b * math.log(b) if b > 0 else 0.0)
        return math.log(n) - ent


def normalise(w: Tensor) -> Tensor:
    """Clip negative weights to 0 and normalise the last axis (an all-zero row, which only an unreachable state
    such as the mask on the uniform graph can produce, stays all zero)."""
    w = w.clamp_min(0)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def check_family(graph: str, loss: str, p_m: float | None = None) -> None:
    """One-line errors for an unknown graph or loss, a pair that does not exist, or ``p_m`` outside [0, 1]."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "subs" and graph != "absorbing":
        raise ValueError(
            f"loss 'subs' (MDLM's carry-over parameterisation) exists for the absorbing graph only; got graph "
            f"{graph!r} (use loss=score_entropy or loss=cedd)"
        )
    if graph == "roulette" and (p_m is None or isinstance(p_m, bool) or not isinstance(p_m, (int, float))
                                or not 0.0 <= float(p_m) <= 1.0):
        raise ValueError(f"roulette p_m must be a number in [0, 1]; got {p_m!r}")


def make_graph(name: str, vocab_size: int, mask_index: int, p_m: float | None = None) -> Graph:
    """The graph ``name`` over the model's vocabulary (see :class:`Graph`)."""
    return Graph(name, vocab_size, mask_index, p_m)
