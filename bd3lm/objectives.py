"""Training objectives: the block-diffusion NELBO (BD3-LM, MDLM as its L' = L limit) and the AR cross-entropy.

Block diffusion NELBO (Arriola et al. 2025, eq. 8; MDLM's continuous-time bound per block)::

    L_BD(x) = Σ_b E_{t ~ U[0,1]} E_{q(x_t^b | x^b)} [ w(t) Σ_{ℓ ∈ b, x_t^ℓ = m} -log p_θ(x^ℓ | x_t^b, x^{<b}) ],
    w(t) = -α'_t / (1 - α_t)

- one noise level t per block, stratified over all (sequence, block) cells of the batch, then randomly permuted
  across cells so every cell's marginal is exactly U[β, ω] (the official code assigns strata in row-major order,
  so later blocks of a row always get more noise);
- SUBS parameterisation (MDLM §3.2): the mask logit is -∞ and unmasked positions carry over, so they contribute
  exactly 0 and are never computed: the output head runs only on the masked rows of the x_t half;
- clipped intervals [β, ω] ≠ [0, 1] also constrain each block's masked fraction to the interval, drawn exactly
  (no rejection loop, see :func:`bd3lm.noise.sample_mask`); the weight is not changed (as in the paper, the clipped
  objective is a training device: evaluation uses the full range);
- time conditioning (``config.time_conditioning``): one noise level per block (BD3-LM, Arriola et al. 2025, §3.2),
  so the network gets one σ per input token: σ(t_b) on the tokens of x_t's block b, and σ = 0 on the clean x_0
  stream of the two-stream input (it is clean); a single block (MDLM) passes one σ per sequence;
- ``interval=(1, 1)`` masks every token with weight 1 (``∫ w(t)(1-α_t) dt = α_0 - α_1 = 1``): with block size 1 this
  is exactly the AR log-likelihood of the two-stream network.

Normalisation: ``loss`` is nats per token, the weighted sum over masked positions divided by the number of tokens
of the batch (masked and unmasked), as in the official code; ``nll_per_seq`` is nats per sequence.

``ignore_first`` (the official ``ignore_bos``): position 0 is never masked, so it is clean context for every
block, and it is not counted: the bound is that of ``-log p(x_{1:L} | x_0)`` over ``L - 1`` tokens (the official
code trains and evaluates this way; an AR model always predicts positions ``1..L-1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bd3lm.estimates import LossOutput, check_token_ids, model_schedule, stratified_t
from bd3lm.noise import check_interval, sample_mask, sample_t
from bd3lm.schedules import NoiseSchedule

FULL_RANGE = (1e-3, 1.0)


def _check_batch(model, x0: Tensor) -> tuple[int, int]:
    check_token_ids(x0)
    if x0.dim() != 2 or x0.shape[0] == 0 or x0.shape[1] == 0:
        raise ValueError(f"x0 must be a non-empty (batch, length) tensor of token ids; got shape {tuple(x0.shape)}")
    if bool((x0 == model.config.mask_index).any()):
        raise ValueError(f"x0 contains the mask token id {model.config.mask_index}; clean data never holds it")
    return x0.shape


def _is_full_range(interval: tuple[float, float]) -> bool:
    """[β, ω] ⊇ [1e-3, 0.999] (the official default buffers) counts as unclipped: masked fractions are free."""
    return interval[0] <= FULL_RANGE[0] + 1e-9 and interval[1] >= 0.999 - 1e-9


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask_index: int) -> Tensor:
    """-log p_θ(x^ℓ) for gathered rows (M, V) under SUBS (the mask token gets probability 0), in float32."""
    logits = logits.float()
    logits[:, mask_index] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


def block_timesteps(sched: NoiseSchedule, t: Tensor, block_size: int) -> Tensor:
    """Per-token σ (B, 2n) of a two-stream input ``cat([x_t, x_0])`` for per-block times ``t`` (B, n_blocks):
    σ(t_b) on x_t's block b and 0 on the clean x_0 half (BD3-LM: one noise level per block, the clean stream is
    at σ = 0)."""
    sigma = sched.sigma(t).float().repeat_interleave(block_size, dim=1)
    return torch.cat([sigma, torch.zeros_like(sigma)], dim=1)


def diffusion_loss(
    model,
    x0: Tensor,
    *,
    schedule: str | NoiseSchedule | None = None,
    interval: tuple[float, float] = FULL_RANGE,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    ignore_first: bool = False,
) -> LossOutput:
    """Monte-Carlo estimate of L_BD (eq. above) for a batch of clean sequences ``x0`` (B, L).

    Args:
        model: a :class:`bd3lm.BD3LM` (two-stream when ``block_size < L``; a plain pass when ``block_size >= L``);
            a time-conditioned model gets per-token σ (:func:`block_timesteps`) when there is more than one block.
        schedule: noise schedule name or object (default: the model's ``config.noise_schedule``).
        interval: [β, ω] ⊆ [0, 1] for t; a strict sub-interval of [1e-3, 1] also clips masked fractions.
        t: optional explicit (B, n_blocks) noise levels (overrides ``interval`` sampling; no clipping).
        generator: random stream (per DDP rank).
        antithetic: stratify t over the batch's cells.
        ignore_first: keep position 0 clean and leave it out of the loss (``n_tokens`` counts ``L - 1`` per row).
    """
    cfg = model.config
    bsz, n = _check_batch(model, x0)
    bs = cfg.block_size
    if n % bs:
        raise ValueError(f"sequence length {n} is not a multiple of block_size {bs}")
    beta, omega = float(interval[0]), float(interval[1])
    if not (0.0 <= beta <= 1.0 and 0.0 <= omega <= 1.0):
        raise ValueError(f"clip interval [{beta}, {omega}] must lie in [0, 1]")
    if beta > omega:
        raise ValueError(f"clip interval [{beta}, {omega}] has beta > omega")
    sched = model_schedule(model, schedule)
    n_blocks = n // bs
    all_masked = t is None and beta >= 1.0
    if all_masked:
        t = torch.ones(bsz, n_blocks, device=x0.device)
        masked = torch.ones_like(x0, dtype=torch.bool)
    else:
        clip = None
        if t is None:
            if antithetic:
                t = stratified_t(bsz, n_blocks, (beta, omega), generator, x0.device)
            else:
                t = sample_t(bsz, n_blocks, interval=(beta, omega), antithetic=False, generator=generator,
                             device=x0.device)
            if not _is_full_range((beta, omega)):
                lo, hi = sched.mask_prob(torch.tensor([beta, omega], dtype=torch.float64)).tolist()
                clip = (lo, hi)
                check_interval(bs, clip)
        elif t.shape != (bsz, n_blocks) or float(t.min()) < 0 or float(t.max()) > 1:
            raise ValueError(f"t must have shape ({bsz}, {n_blocks}) with values in [0, 1]; got {tuple(t.shape)}")
        masked = sample_mask(bsz, n, bs, t, sched, clip=clip, generator=generator)
    if ignore_first:
        if n < 2:
            raise ValueError(f"ignore_first needs sequences of length >= 2; got {n}")
        masked[:, 0] = False
    x_t = torch.where(masked, torch.full_like(x0, cfg.mask_index), x0)

    if bs >= n or not cfg.cross_attn:
        if bs < n:
            raise ValueError(f"block_size {bs} < length {n} needs a cross_attn (two-stream) model")
        timesteps = sched.sigma(t[:, 0]) if cfg.time_conditioning else None
        out = model(input_ids=x_t, timesteps=timesteps, logits_mask=masked)
    else:
        timesteps = block_timesteps(sched, t, bs) if cfg.time_conditioning else None
        out = model(input_ids=torch.cat([x_t, x0], 1), timesteps=timesteps, logits_mask=masked, two_stream=True)
    ce = masked_cross_entropy(out.logits, x0[masked], cfg.mask_index)
    weight = torch.ones_like(t) if all_masked else sched.weight(t.clamp_min(1e-12))
    w_tok = weight.repeat_interleave(bs, dim=1)[masked].float()
    per_token = torch.zeros(bsz, n, device=x0.device, dtype=torch.float32)
    per_token = per_token.masked_scatter(masked, w_tok * ce)
    total = per_token.sum()
    counted = n - 1 if ignore_first else n
    return LossOutput(
        loss=total / (bsz * counted),
        nll_sum=total.detach(),
        n_tokens=bsz * counted,
        per_block=per_token.detach().view(bsz, n_blocks, bs).mean(-1),
        nll_per_seq=per_token.detach().sum(1),
    )


def ar_loss(model, x0: Tensor) -> LossOutput:
    """Next-token cross-entropy of a causal model: Σ_{i≥1} -log p_θ(x_i | x_{<i}) (position 0 is not predicted)."""
    cfg = model.config
    bsz, n = _check_batch(model, x0)
    if n < 2:
        raise ValueError(f"an autoregressive loss needs sequences of length >= 2; got {n}")
    rows = torch.ones(bsz, n - 1, dtype=torch.bool, device=x0.device)
    logits = model(input_ids=x0[:, :-1], logits_mask=rows).logits
    ce = masked_cross_entropy(logits, x0[:, 1:].reshape(-1), cfg.mask_index).view(bsz, n - 1)
    total = ce.sum()
    per_token = F.pad(ce.detach(), (1, 0))
    return LossOutput(
        loss=total / (bsz * (n - 1)),
        nll_sum=total.detach(),
        n_tokens=bsz * (n - 1),
        per_block=per_token,
        nll_per_seq=ce.detach().sum(1),
    )


def is_score_family(model) -> bool:
    """True for a model of the score-entropy family other than MDLM/BD3-LM itself (``loss`` score_entropy or
    cedd, or a non-absorbing graph): its loss and bound are :mod:`bd3lm.score_objectives`."""
    cfg = model.config
    return not cfg.causal and (getattr(cfg, "loss", "subs") or "subs") != "subs"


def loss(model, x0: Tensor, **kw) -> LossOutput:
    """The training loss of ``model``: :func:`ar_loss` for causal models, :func:`bd3lm.score_objectives.score_loss`
    for SEDD / CEDD models, else :func:`diffusion_loss`."""
    if model.config.causal:
        return ar_loss(model, x0)
    if is_score_family(model):
        from bd3lm.score_objectives import score_loss

        return score_loss(model, x0, **kw)
    return diffusion_loss(model, x0, **kw)


def exact_nll(model, x0: Tensor, *, ignore_first: bool = False) -> Tensor:
    """Each sequence's exact NLL in nats (B,) where one forward gives it: AR models and block size 1.

    At L' = 1 the model's likelihood is ``p(x) = Π_ℓ p_θ(x^ℓ | x_t^ℓ = m, x^{<ℓ})`` (this is what the sampler
    draws from), and the NELBO integrand does not depend on t once the single token is masked: for the
    log-linear schedule ``E_t[w(t) (1 - α_t)] = ∫_0^1 (1/t) t dt = 1``, so the bound equals this NLL with no
    Monte-Carlo variance. One forward with every token masked (``interval=(1, 1)``, weight 1) computes it.
    """
    if model.config.causal:
        return ar_loss(model, x0).nll_per_seq
    if model.config.block_size != 1:
        raise ValueError(
            f"the exact NLL needs block_size 1 or a causal model; got block_size {model.config.block_size}"
        )
    return diffusion_loss(model, x0, interval=(1.0, 1.0), ignore_first=ignore_first).nll_per_seq


def has_exact_nll(model) -> bool:
    """True when :func:`exact_nll` applies: causal (AR) models and BD3-LM at block size 1 (time-independent)."""
    cfg = model.config
    absorbing = (getattr(cfg, "graph", "absorbing") or "absorbing") == "absorbing"
    return bool(cfg.causal) or (cfg.block_size == 1 and not cfg.time_conditioning and absorbing)


@torch.no_grad()
def nelbo(
    model,
    input_ids: Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    schedule: str | NoiseSchedule | None = None,
    *,
    ignore_first: bool = False,
    t_min: float = 0.0,
    exact: bool | None = None,
    estimator: str | None = None,
) -> Tensor:
    """Each sequence's NELBO in nats, shape (B,): an unbiased estimate of L_BD averaged over ``num_samples`` draws.

    t is stratified per sequence over its (draw, block) cells on ``[t_min, 1]`` (default the full range [0, 1],
    no truncation), with the strata randomly assigned to cells so each block's t is marginally uniform.
    ``t_min = 1e-3`` is the official evaluation range: the integral over [1e-3, 1] with the density renormalised
    by ``1 / (1 - 1e-3)``, exactly what averaging ``w(t) · loss`` over ``t ~ U[1e-3, 1]`` estimates.

    ``exact`` (default: where available, see :func:`has_exact_nll`) returns the exact NLL in one forward instead:
    always for causal (AR) models (positions 1..L-1), and for BD3-LM at block size 1.
    ``ignore_first``: position 0 is clean context and not counted (see the module docstring).
    ``estimator``: ``"j1"`` / ``"j2"`` evaluates the score-entropy bounds of :func:`bd3lm.score_objectives.score_bound`
    (any graph and loss; on the absorbing graph J1 of an MDLM network equals this NELBO); ``None`` = this NELBO
    for MDLM/BD3-LM networks and J1 for the SEDD/CEDD family (integrated over ``[t_min, 1]``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
    if not 0.0 <= float(t_min) < 1.0:
        raise ValueError(f"t_min must lie in [0, 1); got {t_min!r}")
    check_token_ids(input_ids, "input_ids")
    if exact is None:
        exact = has_exact_nll(model) and estimator is None
    if exact:
        return exact_nll(model, input_ids, ignore_first=ignore_first)
    if estimator is not None and model.config.causal:
        raise ValueError(f"estimator={estimator!r} applies to diffusion models; an AR model's NLL is exact")
    if estimator is not None or is_score_family(model):
        from bd3lm.score_objectives import score_bound

        return score_bound(model, input_ids, estimator=estimator or "j1", num_samples=num_samples,
                           generator=generator, schedule=schedule, ignore_first=ignore_first, t_min=t_min).float()
    bsz, n = _check_batch(model, input_ids)
    bs = model.config.block_size
    if n % bs:
        raise ValueError(f"sequence length {n} is not a multiple of block_size {bs}")
    n_blocks = n // bs
    cells = num_samples * n_blocks
    dev = generator.device if generator is not None else None
    u = torch.rand(bsz, cells, generator=generator, device=dev, dtype=torch.float64)
    strata = torch.argsort(torch.rand(bsz, cells, generator=generator, device=dev), dim=1)
    t_all = float(t_min) + (1.0 - float(t_min)) * (strata.double() + u) / cells
    t_all = t_all.float().to(input_ids.device).view(bsz, num_samples, n_blocks)
    total = torch.zeros(bsz, dtype=torch.float64, device=input_ids.device)
    for k in range(num_samples):
        out = diffusion_loss(model, input_ids, schedule=schedule, t=t_all[:, k], generator=generator,
                             ignore_first=ignore_first)
        total += out.nll_per_seq.double()
    return (total / num_samples).float()
