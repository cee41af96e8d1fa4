"""Likelihood evaluation: the NELBO perplexity bound of a model on a set of chunks, with its uncertainty.

For each sequence ``i`` the per-token NELBO ``s_i = NELBO(x_i) / T`` (``T`` counted tokens per sequence) is
estimated with ``K`` Monte-Carlo draws of one t per block (:func:`bd3lm.objectives.nelbo`); the reported value is
``nll = mean_i s_i`` with the standard error ``se = std_i(s_i) / sqrt(N)`` across sequences (it contains both the
data's and the Monte-Carlo variance), a 95% interval ``nll ± 1.96 se``, and the perplexity *bound*
``ppl ≤ exp(nll)``. Where the bound is exact (AR models; BD3-LM at block size 1, see
:func:`bd3lm.objectives.exact_nll`) one forward gives the exact NLL and ``K`` is irrelevant.

The interval is a normal approximation. Over the full range the 1/t weight (log-linear schedule) makes the
per-block estimate heavy-tailed — a token masked at a tiny t has weight 1/t, and the variance integral
∫ t · t^-2 dt diverges at 0 — so rare draws can move the mean more than the interval suggests; the official range
[1e-3, 1] bounds the weight at 1000. Stratifying t over each sequence's (draw, block) cells keeps such draws rare.

Protocols (:data:`PROTOCOLS`):

- ``full`` (default): t over the whole range [0, 1]; position 0 counted unless the model was trained with
  ``ignore_bos``; documents separated by EOS.
- ``official`` (the BD3-LM code's ``ppl_eval``): t over [1e-3, 1], position 0 kept clean and not counted
  (``ignore_bos``), EOS between documents, one draw per sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from bd3lm.evaluation.checks import check_int
from bd3lm.objectives import has_exact_nll, nelbo

__all__ = ["PROTOCOLS", "LikelihoodResult", "Protocol", "likelihood"]


@dataclass(frozen=True)
class Protocol:
    """How the bound is computed. ``ignore_first=None``: the model's ``config.ignore_bos``."""

    name: str
    t_min: float
    ignore_first: bool | None
    insert_eos: bool
    num_samples: int


PROTOCOLS: dict[str, Protocol] = {
    "full": Protocol("full", t_min=0.0, ignore_first=None, insert_eos=True, num_samples=4),
    "official": Protocol("official", t_min=1e-3, ignore_first=True, insert_eos=True, num_samples=1),
}


@dataclass
class LikelihoodResult:
    """Per-token NELBO (nats) with its standard error across sequences, and the perplexity bound."""

    nll: float
    se: float
    ci95: tuple[float, float]
    ppl: float
    ppl_ci95: tuple[float, float]
    bpd: float
    exact: bool
    protocol: str
    t_range: tuple[float, float]
    ignore_first: bool
    num_samples: int
    n_sequences: int
    tokens_per_sequence: int
    n_tokens: int
    per_sequence: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, per_sequence: bool = False) -> dict:
        d = asdict(self)
        if not per_sequence:
            d.pop("per_sequence")
        return d

    def describe(self) -> str:
        """One line: ``PPL ≤ 123.4 (95% CI [120.1, 126.8]); NELBO 4.816 ± 0.014 nats/token ...``."""
        if self.exact:
            head = f"PPL = {self.ppl:.2f} (exact NLL)"
        else:
            head = f"PPL ≤ {self.ppl:.2f} (95% CI [{self.ppl_ci95[0]:.2f}, {self.ppl_ci95[1]:.2f}])"
        what = "NLL" if self.exact else "NELBO"
        t = "no t integral (exact)" if self.exact else f"t in [{self.t_range[0]:g}, {self.t_range[1]:g}]"
        return (
            f"{head}; {what} {self.nll:.4f} ± {self.se:.4f} nats/token over {self.n_sequences} sequences x "
            f"{self.tokens_per_sequence} tokens; protocol {self.protocol}: {t}, position 0 "
            f"{'excluded' if self.ignore_first else 'counted'}, K = {self.num_samples}"
        )


def _check_chunks(model, chunks: Tensor) -> Tensor:
    if not isinstance(chunks, Tensor) or chunks.dim() != 2 or chunks.shape[0] == 0:
        shape = tuple(chunks.shape) if isinstance(chunks, Tensor) else type(chunks).__name__
        raise ValueError(f"chunks must be a non-empty (N, L) tensor of token ids; got {shape}")
    if torch.is_floating_point(chunks):
        raise ValueError(f"chunks must hold integer token ids; got dtype {chunks.dtype}")
    length = model.config.model_length
    if chunks.shape[1] != length:
        raise ValueError(f"chunks have length {chunks.shape[1]}; the model's model_length is {length}")
    return chunks.long()


@torch.no_grad()
def likelihood(
    model,
    chunks: Tensor,
    *,
    protocol: str | Protocol = "full",
    num_samples: int | None = None,
    ignore_first: bool | None = None,
    t_min: float | None = None,
    exact: bool | None = None,
    max_sequences: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    schedule: str | None = None,
    estimator: str | None = None,
) -> LikelihoodResult:
    """NELBO perplexity bound of ``model`` on ``chunks`` (N, model_length) under ``protocol``.

    Args:
        protocol: ``"full"``, ``"official"`` or a :class:`Protocol`; the keyword arguments below override it.
        num_samples: Monte-Carlo draws K per sequence (>= 1).
        ignore_first: leave position 0 out (clean context); default: the protocol's, else ``config.ignore_bos``.
        t_min: lower end of the t range ([t_min, 1]).
        exact: use the exact NLL where it exists (default: where available).
        max_sequences: evaluate only the first this many chunks.
        batch_size: sequences per forward. seed: the Monte-Carlo stream.
        schedule: noise schedule of the time integral (default: the model's ``noise_schedule``).
        estimator: ``None`` (the NELBO; J1 for SEDD/CEDD models), ``"j1"`` or ``"j2"``
            (:func:`bd3lm.score_objectives.score_bound`).
    """
    if estimator not in (None, "j1", "j2"):
        raise ValueError(f"estimator must be j1, j2 or None; got {estimator!r}")
    if estimator is not None and exact:
        raise ValueError(f"estimator={estimator} is a Monte-Carlo bound; it cannot be combined with exact=true")
    if schedule is None:
        schedule = getattr(model.config, "noise_schedule", None) or "loglinear"
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
        protocol = PROTOCOLS[protocol]
    k = protocol.num_samples if num_samples is None else num_samples
    check_int(k, "num_samples (K)")
    check_int(batch_size, "batch_size")
    if max_sequences is not None and (not isinstance(max_sequences, int) or max_sequences < 1):
        raise ValueError(f"max_sequences must be an integer >= 1 or None; got {max_sequences!r}")
    chunks = _check_chunks(model, chunks)
    if max_sequences is not None:
        chunks = chunks[:max_sequences]
    first = protocol.ignore_first if ignore_first is None else ignore_first
    first = bool(model.config.ignore_bos) if first is None else bool(first)
    lo = float(protocol.t_min if t_min is None else t_min)
    use_exact = (has_exact_nll(model) and estimator is None) if exact is None else bool(exact)
    if use_exact and not has_exact_nll(model):
        raise ValueError(f"exact NLL needs a causal model or block_size 1; got block_size {model.config.block_size}")
    # an AR model never predicts position 0, whatever the protocol says
    first = first or bool(model.config.causal)
    counted = chunks.shape[1] - (1 if first else 0)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    per_seq: list[Tensor] = []
    try:
        for i in range(0, chunks.shape[0], batch_size):
            x0 = chunks[i : i + batch_size].to(device)
            nll = nelbo(model, x0, num_samples=k, generator=gen, schedule=schedule, ignore_first=first,
                        t_min=lo, exact=use_exact, estimator=estimator)
            per_seq.append(nll.double().cpu() / counted)
    finally:
        model.train(was_training)
    s = torch.cat(per_seq)
    n = s.numel()
    mean = float(s.mean())
    se = float(s.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    ci = (mean - 1.96 * se, mean + 1.96 * se)
    return LikelihoodResult(
        nll=mean,
        se=se,
        ci95=ci,
        ppl=math.exp(mean),
        ppl_ci95=(math.exp(ci[0]), math.exp(ci[1])) if math.isfinite(se) else (float("nan"), float("nan")),
        bpd=mean / math.log(2),
        exact=use_exact,
        protocol=protocol.name,
        t_range=(lo, 1.0),
        ignore_first=first,
        num_samples=1 if use_exact else k,
        n_sequences=n,
        tokens_per_sequence=counted,
        n_tokens=n * counted,
        per_sequence=s.tolist(),
    )
