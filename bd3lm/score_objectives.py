"""Objectives and likelihood bounds of the score-entropy family (SEDD, CEDD) on any graph, whole-sequence or per block.

A model of the family is a :class:`bd3lm.BD3LM` whose config names a ``graph`` (:mod:`bd3lm.graphs`) and a
``loss``, the parameterisation of its output:

- ``subs``: MDLM/BD3-LM (absorbing only): logits of ``p_θ(x_0 | x_t)`` with SUBS, trained with the NELBO
  (:mod:`bd3lm.objectives`);
- ``score_entropy``: SEDD (Lou et al. 2024): the output is the log concrete score ``log s_θ(x_t)_{i,y}``; on the
  absorbing graph scaled as SEDD does, ``log s = f - log(e^σ - 1) - log N`` (so a zero output layer starts at the
  true total mass ``1 / (e^σ - 1)``), trained with the diffusion-weighted denoising score entropy (SEDD eq. 10)::

      L_DWDSE(x_0) = ∫_0^1 σ'(t) E_{x_t ~ p_{t|0}} Σ_i Σ_{y ≠ x_t^i} Q[x_t^i, y] (s_y - r_y log s_y + K(r_y)) dt,

- ``cedd``: denoising cross-entropy (Haxholli et al. 2025): logits of ``p_θ(x_0^i | x_t)`` trained with
  ``w(t) · (-log p_θ(x_0^i | x_t))`` at the masked positions (absorbing) or every position (uniform, roulette),
  ``w = 1`` (CEDD) or ``w = log(e + 0.3 / t)`` (``cedd_weight="log"``, CEDD*); its ratios are
  ``E_{p_θ}[p(y|x_0) / p(x_t|x_0)]`` (:meth:`bd3lm.graphs.Graph.probs_to_ratio`).

Block mode (BD3-LM): one noise level t per block, stratified; the two-stream pass ``[x_t ; x_0]`` conditions block
b on the clean blocks before it; a time-conditioned network gets σ per token (σ of its block, 0 for the clean
stream). Block size L is the whole-sequence model; the bound is the sum over blocks of each block's bound.

Bounds (``nats`` per sequence, over the positions counted):

- **J1** (SEDD): ``∫_{t_min}^{T} σ' E Σ_i ℓ_i dt + KL(p_{T|0} || π)``, ℓ the score entropy *with* K, with
  ``T = 1 - 1e-6`` (σ(1) = ∞ on the log-linear schedule) and the KL left out on graphs with a mask state (SEDD);
- **J2** (Haxholli et al. 2025): the same integrand *without* K, plus per token the value of the K term's
  integral, ``H(p_{σ_hi|0}) - H(p_{σ_lo|0}) - ∫ σ' E[-Q[x_t, x_t]] dt`` (entropy production of the forward
  process between the ends of the integral): the same expectation as J1 for any model and any ``t_min`` (checked
  by enumeration in the tests), with the ``K`` term replaced by constants.
  Its variance is not always lower: with the mean parameterisation on the absorbing graph ``K`` cancels inside J1
  and J2's constants reappear as a ``log t / t`` term (see the tests and the README).

Normalisation as :func:`bd3lm.objectives.diffusion_loss`: ``loss`` is nats per token, ``nll_per_seq`` nats per
sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bd3lm.estimates import LossOutput, check_token_ids, model_schedule, stratified_t
from bd3lm.graphs import LOSSES, Graph, check_family, make_graph
from bd3lm.noise import sample_t
from bd3lm.schedules import NoiseSchedule

__all__ = ["CEDD_WEIGHTS", "LOSSES", "check_family", "graph_of", "model_ratios", "score_bound", "score_loss"]

CEDD_WEIGHTS = ("one", "log")
#: t is kept below this in the graph math: σ(1) = ∞ for the log-linear schedule.
T_MAX = 1.0 - 1e-6


def family(model) -> tuple[str, str, float | None]:
    """(graph, loss, p_m) of a model's config (official checkpoints: absorbing, subs)."""
    cfg = model.config
    return getattr(cfg, "graph", "absorbing") or "absorbing", getattr(cfg, "loss", "subs") or "subs", getattr(
        cfg, "p_m", None
    )


def graph_of(model) -> Graph:
    """The :class:`Graph` of ``model`` over its vocabulary."""
    name, loss, p_m = family(model)
    check_family(name, loss, p_m)
    return make_graph(name, model.config.vocab_size, model.config.mask_index, p_m)


def sigma_and_rate(schedule: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """Unclamped total noise ``σ(t) = -log α_t`` and rate ``σ'(t) = -α'_t / α_t`` in float64 (t ≤ :data:`T_MAX`)."""
    t = t.double().clamp(max=T_MAX)
    alpha = schedule.alpha(t)
    return -torch.log(alpha), -schedule.alpha_prime(t) / alpha


def log_score(
    model, graph: Graph, logits: Tensor, x_t: Tensor, sigma: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The model's log ratios ``log s_θ(x_t)_{·}`` (M, V) for output rows ``logits`` (M, V) at states ``x_t`` (M,)
    and total noise ``sigma`` (M,) — the network's output itself for ``score_entropy`` (with SEDD's absorbing
    scaling), else the log of :meth:`~bd3lm.graphs.Graph.probs_to_ratio` of its clean-token distribution;
    computed and returned in ``dtype``."""
    loss = family(model)[1]
    f = logits.to(dtype)
    if loss == "score_entropy":
        if graph.absorbing:
            scale = torch.log(torch.expm1(sigma.double())).to(dtype) + math.log(graph.n_clean)
            f = f - scale[:, None]
        return f
    probs = clean_probs(f, graph.mask_index).double()
    s = graph.probs_to_ratio(probs, x_t, sigma.double())
    return torch.log(s.clamp_min(1e-300)).to(dtype)


def clean_probs(logits: Tensor, mask_index: int) -> Tensor:
    """``p_θ(x_0 | x_t)`` over the clean tokens (the mask gets probability 0), in the dtype of ``logits`` (at least
    float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).clone()
    logits[..., mask_index] = float("-inf")
    return logits.softmax(-1)


def model_ratios(model, graph: Graph, logits: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
    """Ratios ``s_θ`` (..., V) in float64 for the samplers (``exp`` of :func:`log_score`, 1 at ``x_t``)."""
    shape = logits.shape
    ls = log_score(model, graph, logits.reshape(-1, shape[-1]), x_t.reshape(-1), sigma.reshape(-1), torch.float64)
    s = torch.exp(ls.double()).scatter(-1, x_t.reshape(-1, 1), 1.0)
    return s.view(shape)


def _noisy_pass(model, graph: Graph, x0: Tensor, t: Tensor, schedule: NoiseSchedule, ignore_first: bool, generator):
    """Corrupt ``x0`` with one t per block, run the network on the rows a loss reads; returns
    (rows (B, L) bool, x_t rows, x_0 rows, t rows, σ rows, σ' rows, logits rows)."""
    cfg = model.config
    bsz, n = x0.shape
    bs = cfg.block_size
    t_tok = t.repeat_interleave(bs, dim=1)
    sigma, rate = sigma_and_rate(schedule, t_tok)
    x_t = graph.sample_transition(x0, sigma, generator=generator)
    if ignore_first:
        x_t[:, 0] = x0[:, 0]
    rows = (x_t == cfg.mask_index) if graph.absorbing else torch.ones_like(x0, dtype=torch.bool)
    if ignore_first:
        rows[:, 0] = False
    timesteps = sigma.float() if cfg.time_conditioning else None  # σ(t) itself, finite up to T_MAX
    two_stream = bs < n
    if two_stream:
        if not cfg.cross_attn:
            raise ValueError(f"block_size {bs} < length {n} needs a cross_attn (two-stream) model")
        inp = torch.cat([x_t, x0], 1)
        if timesteps is not None:
            timesteps = torch.cat([timesteps, torch.zeros_like(timesteps)], 1)
    else:
        inp = x_t
        if timesteps is not None and n > 0:
            timesteps = timesteps[:, 0]  # one block: one σ per sequence
    logits = model(input_ids=inp, timesteps=timesteps, logits_mask=rows, two_stream=two_stream).logits
    return rows, x_t[rows], x0[rows], t_tok[rows], sigma[rows], rate[rows], logits


def _times(bsz: int, n_blocks: int, interval, t, antithetic: bool, generator, device) -> Tensor:
    if t is not None:
        if t.shape != (bsz, n_blocks) or float(t.min()) < 0 or float(t.max()) > 1:
            raise ValueError(f"t must have shape ({bsz}, {n_blocks}) with values in [0, 1]; got {tuple(t.shape)}")
        return t.double()
    if antithetic:
        return stratified_t(bsz, n_blocks, interval, generator, device).double()
    return sample_t(bsz, n_blocks, interval=interval, antithetic=False, generator=generator, device=device).double()


def _check(model, x0: Tensor) -> tuple[int, int, int]:
    cfg = model.config
    check_token_ids(x0)
    if x0.dim() != 2 or x0.shape[0] == 0 or x0.shape[1] == 0:
        raise ValueError(f"x0 must be a non-empty (batch, length) tensor of token ids; got shape {tuple(x0.shape)}")
    if bool((x0 == cfg.mask_index).any()):
        raise ValueError(f"x0 contains the mask token id {cfg.mask_index}; clean data never holds it")
    bsz, n = x0.shape
    if n % cfg.block_size:
        raise ValueError(f"sequence length {n} is not a multiple of block_size {cfg.block_size}")
    return bsz, n, n // cfg.block_size


def _per_token(rows: Tensor, values: Tensor) -> Tensor:
    out = torch.zeros(rows.shape, dtype=values.dtype, device=rows.device)
    return out.masked_scatter(rows, values)


def score_loss(
    model,
    x0: Tensor,
    *,
    schedule: str | NoiseSchedule | None = None,
    interval: tuple[float, float] = (1e-3, 1.0),
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    ignore_first: bool = False,
    cedd_weight: str = "one",
) -> LossOutput:
    """Training loss of a ``score_entropy`` or ``cedd`` model (see the module docstring); one t per block.
    ``schedule`` defaults to the model's ``config.noise_schedule``; a time-conditioned network reads σ(t) itself
    (not clamped: on the log-linear schedule it reaches σ(1 - 1e-6) ≈ 13.8)."""
    graph = graph_of(model)
    loss_kind = family(model)[1]
    if loss_kind == "subs":
        raise ValueError(
            "loss 'subs' is trained by bd3lm.objectives.diffusion_loss; score_loss takes score_entropy or cedd"
        )
    if cedd_weight not in CEDD_WEIGHTS:
        raise ValueError(f"unknown cedd_weight {cedd_weight!r}; expected one of {', '.join(CEDD_WEIGHTS)}")
    sched = model_schedule(model, schedule)
    bsz, n, n_blocks = _check(model, x0)
    beta, omega = float(interval[0]), float(interval[1])
    if not (0.0 <= beta <= omega <= 1.0):
        raise ValueError(f"time interval [{beta}, {omega}] must satisfy 0 <= beta <= omega <= 1")
    t = _times(bsz, n_blocks, (beta, omega), t, antithetic, generator, x0.device)
    t = t.clamp_min(1e-6)
    rows, x_t, x0_r, t_r, sigma, rate, logits = _noisy_pass(model, graph, x0, t, sched, ignore_first, generator)
    if loss_kind == "score_entropy":
        ls = log_score(model, graph, logits, x_t, sigma)
        per = rate.float() * graph.score_entropy(ls, x_t, x0_r, sigma.float())
    else:
        ce = F.cross_entropy(
            logits.float().index_fill(-1, torch.tensor([graph.mask_index], device=logits.device), float("-inf")),
            x0_r,
            reduction="none",
        )
        w = torch.ones_like(t_r) if cedd_weight == "one" else torch.log(math.e + 0.3 / t_r)
        per = w.float() * ce
    per_token = _per_token(rows, per.float())
    counted = n - 1 if ignore_first else n
    total = per_token.sum()
    return LossOutput(
        loss=total / (bsz * counted),
        nll_sum=total.detach(),
        n_tokens=bsz * counted,
        per_block=per_token.detach().view(bsz, n_blocks, -1).mean(-1),
        nll_per_seq=per_token.detach().sum(1),
    )


@torch.no_grad()
def score_bound(
    model,
    x0: Tensor,
    *,
    estimator: str = "j1",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    schedule: str | NoiseSchedule | None = None,
    ignore_first: bool = False,
    t_min: float = 0.0,
) -> Tensor:
    """Each sequence's perplexity bound in nats (B,), J1 or J2 (module docstring), for any graph and loss.

    t is stratified per sequence over its (draw, block) cells on ``[t_min, 1]`` (clamped at ``T = 1 - 1e-6``); the
    time integral is ``(1 - t_min)`` times the average, and both constants are taken at σ(t_min) and σ(T).
    ``schedule`` defaults to the model's ``config.noise_schedule``.
    """
    if estimator not in ("j1", "j2"):
        raise ValueError(f"unknown estimator {estimator!r}; expected j1 or j2")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
    if not 0.0 <= float(t_min) < 1.0:
        raise ValueError(f"t_min must lie in [0, 1); got {t_min!r}")
    graph = graph_of(model)
    sched = model_schedule(model, schedule)
    bsz, n, n_blocks = _check(model, x0)
    s_lo, s_hi = (float(v) for v in sigma_and_rate(sched, torch.tensor([float(t_min), 1.0]))[0])
    counted = n - 1 if ignore_first else n
    # both integrate t over [t_min, T_MAX] (σ_hi = σ(T_MAX), finite); J1 adds KL(p_{σ_hi|0} || π) (0 with a mask
    # state, as SEDD); J2 swaps ∫ σ' E Σ Q K(r) for its value H(p_{σ_hi|0}) - H(p_{σ_lo|0}) - outflow(σ_lo, σ_hi)
    const = counted * graph.prior_kl(s_hi)
    if estimator == "j2":
        const += counted * (graph.conditional_entropy(s_hi) - graph.conditional_entropy(s_lo)
                            - graph.outflow_integral(s_lo, s_hi))
    cells = num_samples * n_blocks
    dev = generator.device if generator is not None else None
    u = torch.rand(bsz, cells, generator=generator, device=dev, dtype=torch.float64)
    strata = torch.argsort(torch.rand(bsz, cells, generator=generator, device=dev), dim=1)
    t_all = (float(t_min) + (1.0 - float(t_min)) * (strata.double() + u) / cells).to(x0.device)
    t_all = t_all.view(bsz, num_samples, n_blocks).clamp_min(1e-6)
    total = torch.zeros(bsz, dtype=torch.float64, device=x0.device)
    for k in range(num_samples):
        rows, x_t, x0_r, _, sigma, rate, logits = _noisy_pass(model, graph, x0, t_all[:, k], sched, ignore_first,
                                                              generator)
        ls = log_score(model, graph, logits, x_t, sigma, torch.float64)
        if estimator == "j1":
            ell = graph.score_entropy(ls, x_t, x0_r, sigma)
        else:
            ell = graph.score_entropy_without_k(ls, x_t, x0_r, sigma)
        total += _per_token(rows, rate * ell).double().sum(1)
    return (1.0 - float(t_min)) * total / num_samples + const
