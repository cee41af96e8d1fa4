"""Logits processing and categorical sampling shared by every update rule.

Order of operations (the Hugging Face ``generate`` order): SUBS mask removal, temperature, top-k, top-p.

- **SUBS at sampling** (Sahoo et al. 2024, MDLM §3.2.3; BD3-LM §3): the mask token never receives probability
  mass, so its logit is set to ``-inf`` before any normalisation.
- **Temperature** ``T``: logits are divided by ``T``; ``T = 0`` is greedy decoding (``argmax``, no
  randomness).
- **Top-k**: keep the tokens whose logit is ``>=`` the k-th largest (ties at the boundary are kept, as in
  ``transformers.TopKLogitsWarper``); ``k = 0`` disables it.
- **Top-p (nucleus, Holtzman et al. 2020)**, two rules (``p = 1`` disables both):

  - ``rule="hf"`` (default), *Hugging Face convention*: keep the smallest set of most probable tokens whose
    total probability is ``>= p``, i.e. a token is kept iff the probability mass of the tokens ranked
    strictly above it is ``< p``. The token that crosses ``p`` is therefore **kept**.
  - ``rule="official"``, the rule of the official BD3-LM code (kuleshov-group/bd3lms): keep the tokens whose
    cumulative probability *including themselves* is ``<= p``, plus the top-1 always. The token that crosses
    ``p`` is **dropped**, so the retained mass is at most ``p`` (below ``p`` unless a cumulative sum equals
    it exactly), unless the top-1 alone exceeds ``p``.

  The official nucleus is a subset of the Hugging Face one and is at most one token smaller (the crossing
  token). Ties are ranked by token id (stable sort) under both rules.
- **Sampling** is done in float64 by inverting the CDF: one uniform per row, the first token whose cumulative
  probability exceeds it. It returns ``v`` with probability exactly ``p_v`` (no float32 Gumbel truncation,
  Zheng et al. 2024) and never a token with ``p_v = 0``, and costs one random number per row instead of one
  per vocabulary entry. All randomness comes from one ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TOP_P_RULES",
    "TokenSampler",
    "check_sampling_args",
    "check_top_p_rule",
    "sample_categorical",
    "subs_logits",
    "top_k_filter",
    "top_p_filter",
]

_NEG_INF = float("-inf")

#: Accepted values of the nucleus rule (see the module docstring).
TOP_P_RULES = ("hf", "official")


def check_top_p_rule(rule: object) -> str:
    """Return ``rule`` if it is ``"hf"`` or ``"official"``, else raise a one-line ``ValueError``."""
    if not isinstance(rule, str) or rule not in TOP_P_RULES:
        raise ValueError(f"top_p_rule must be 'hf' or 'official'; got {rule!r}")
    return rule


def check_sampling_args(temperature: float, top_k: int, top_p: float, top_p_rule: str = "hf") -> None:
    """Raise a one-line ``ValueError`` naming the bad value of ``temperature``, ``top_k``, ``top_p`` or
    ``top_p_rule``."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off); got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    check_top_p_rule(top_p_rule)


def subs_logits(logits: Tensor, mask_index: int) -> Tensor:
    """float64 copy of ``logits`` with the mask token's logit set to ``-inf`` (SUBS: m never gets mass)."""
    out = logits.to(torch.float64)
    out[..., mask_index] = _NEG_INF
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set to ``-inf`` every logit below the ``k``-th largest of its row (ties kept); ``k = 0`` is a no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_filter(logits: Tensor, p: float, rule: str = "hf") -> Tensor:
    """Nucleus filter (see the module docstring); ``p = 1`` is a no-op under both rules.

    ``rule="hf"`` (Hugging Face): a token is removed iff the probability mass of the tokens ranked strictly
    above it is ``>= p`` (the token that crosses ``p`` is kept). ``rule="official"`` (BD3-LM code): a token is
    kept iff the cumulative probability of the tokens ranked up to and including it is ``<= p`` (the token
    that crosses ``p`` is removed). The most probable token is always kept.
    """
    check_top_p_rule(rule)
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    mass_above = cum - sorted_p
    remove_sorted = mass_above >= p  # the top-1 has mass_above == 0 < p: always kept
    if rule == "official":
        # cum <= p implies mass_above < p in exact arithmetic; or-ing keeps the official nucleus inside the
        # hf one even when a token's probability is lost to rounding in ``cum``.
        remove_sorted = remove_sorted | (cum > p)
        remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of the categorical ``softmax(log_probs)`` by inverting its float64 CDF.

    With ``C_v = sum_{w <= v} p_w`` and ``u ~ U[0, C_V)``, the draw is the first ``v`` with ``C_v > u``: it is
    ``v`` with probability exactly ``p_v / C_V`` (the interval ``[C_{v-1}, C_v)`` has length ``p_v``), and a
    token with ``p_v = 0`` (an empty interval) never wins. One uniform per row, where a Gumbel race needs one
    exponential per vocabulary entry.
    """
    cum = log_probs.to(torch.float64).exp().cumsum(dim=-1)
    total = cum[..., -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=cum.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < C_V despite rounding
    return torch.searchsorted(cum, u, right=True).squeeze(-1)


class TokenSampler:
    """Turns raw logits into tokens with the shared processing; owns the run's random generator.

    Args:
        mask_index: id of the mask token (never sampled).
        temperature: ``0`` = greedy ``argmax``; otherwise logits are divided by it.
        top_k: keep the ``k`` most likely tokens (``0`` = off).
        top_p: nucleus mass in (0, 1] (``1`` = off).
        generator: the source of every random draw of the run (reproducible with a seed).
        top_p_rule: ``"hf"`` (Hugging Face: the token that crosses ``p`` is kept) or ``"official"`` (the
            BD3-LM code: the token that crosses ``p`` is dropped).
    """

    def __init__(
        self,
        mask_index: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        top_p_rule: str = "hf",
    ) -> None:
        check_sampling_args(temperature, top_k, top_p, top_p_rule)
        self.mask_index = int(mask_index)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.top_p_rule = top_p_rule
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def log_probs(self, logits: Tensor) -> Tensor:
        """float64 log-probabilities of the *sampling* distribution (temperature, top-k, top-p applied).

        At temperature 0 this is the model distribution (temperature 1) with the same filters; :meth:`sample`
        then takes its argmax.
        """
        x = subs_logits(logits, self.mask_index)
        if not self.greedy:
            x = x / self.temperature
        x = top_k_filter(x, self.top_k)
        x = top_p_filter(x, self.top_p, self.top_p_rule)
        return torch.log_softmax(x, dim=-1)

    def model_probs(self, logits: Tensor) -> Tensor:
        """float64 ``p_theta(x0)`` at temperature 1 without filters (SUBS: the mask has probability 0)."""
        return torch.softmax(subs_logits(logits, self.mask_index), dim=-1)

    def sample(self, logits: Tensor) -> Tensor:
        """Tokens (...,) for raw logits (..., V): greedy ``argmax`` at temperature 0, else a float64 draw."""
        if self.greedy:
            return torch.argmax(subs_logits(logits, self.mask_index), dim=-1)
        return sample_categorical(self.log_probs(logits), self.generator)

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """float64 uniforms in [0, 1) from the run's generator (used by the update rules)."""
        return torch.rand(shape, dtype=torch.float64, device=device, generator=self.generator)
