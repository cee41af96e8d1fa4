"""``bd3lm.training.module.validation_nelbo`` (what training logs as ``val/nll``) against an exact NELBO enumeration.

Oracle: a tiny model with 2 real tokens + the mask and L = 4, so every sequence (16) and every mask pattern of every
block can be enumerated. The continuous-time NELBO of a sequence with the SUBS parameterisation is

    sum_b sum_{S subset of block b, S non-empty} c_b(S) * integral_0^1 w(t) (1 - alpha_t)^k alpha_t^(L'-k) dt
        = sum_b sum_S c_b(S) * B(k, L' - k + 1)        (k = |S|; any schedule with alpha_0 = 1, alpha_1 = 0)

where c_b(S) = sum over the masked positions of -log p_theta(x^l | block b with S masked, x^{<b}), from one uncached
block-causal forward per pattern. (With ``ignore_bos``, position 0 is never masked nor counted; at block size 1 and
for AR models the bound is the exact NLL, computed here position by position.)

``validation_nelbo`` is a one-draw Monte-Carlo estimate of that sum; over K independent seeds its mean must lie
within 5 standard errors of the enumeration (SE from the K totals' sample SD). Each such check fails falsely with
probability ~6e-7 under the normal approximation. (With the log-linear schedule the single-draw estimator's variance
diverges logarithmically, w(t) = 1/t against P(mask) ~ t; self-normalised sums of such a law are still asymptotically
normal (it lies in the normal domain of attraction), so the bound is asymptotic there; with the cosine schedule the
variance is finite.) Every check also has power: the alternative it must be told apart from lies > 10 SE away.
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from conftest import tiny_model

import bd3lm
from bd3lm.training.module import block_size_override, validation_nelbo

V, MASK, L = 3, 2, 4
ALL = torch.tensor(list(product(range(MASK), repeat=L)))  # the 16 sequences of 2 real tokens


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (the machine is shared; conftest's module-scoped fixture restores it)."""


def model_at(block_size: int, **kw) -> bd3lm.BD3LM:
    """A tiny random model whose predictions depend strongly on the context (query/key weights x3, values x2, head
    x1.5): its NELBO at block size 4 is 1.4 nats per sequence below the one at block size 2."""
    model = tiny_model(3, vocab_size=V, model_length=L, block_size=block_size, **kw)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            w, d = blk.attn_qkv.weight, blk.attn_qkv.weight.shape[1]
            w[: 2 * d].mul_(3.0)
            w[2 * d :].mul_(2.0)
        model.backbone.output_layer.linear.weight.mul_(1.5)
    return model


def same_weights(model: bd3lm.BD3LM, block_size: int) -> bd3lm.BD3LM:
    """A fresh model built at ``block_size`` holding ``model``'s weights (not block_size_override)."""
    cfg = model.config.to_dict()
    cfg.update(block_size=block_size)
    for key in ("model_type", "transformers_version", "architectures"):
        cfg.pop(key, None)
    twin = bd3lm.BD3LM(bd3lm.BD3LMConfig(**cfg))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logits[..., MASK] = -math.inf
    return logits.log_softmax(-1)


def enumerated_nelbo(model, x: torch.Tensor, ignore_first: bool = False) -> torch.Tensor:
    """(B,) exact NELBO by enumeration (see the module docstring); uncached plain forwards at the model's L'."""
    bs = model.config.block_size
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for b in range(L // bs):
        blk = x[:, b * bs : (b + 1) * bs]
        free = [j for j in range(bs) if not (ignore_first and b == 0 and j == 0)]
        n = len(free)
        for pattern in product([0, 1], repeat=n):
            k = sum(pattern)
            if k == 0:
                continue
            s = torch.zeros(bs, dtype=torch.bool)
            s[[free[i] for i, p in enumerate(pattern) if p]] = True
            lp = logprobs(model, torch.cat([x[:, : b * bs], torch.where(s, MASK, blk)], 1))[:, b * bs :]
            c = -(lp.gather(-1, blk[..., None]).squeeze(-1) * s).sum(-1)
            total += c * math.gamma(k) * math.gamma(n - k + 1) / math.gamma(n + 1)
    return total


def totals(model, batches, seeds, **kw) -> torch.Tensor:
    out = []
    for s in seeds:
        total, _ = validation_nelbo(model, batches, seed=s, **kw)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def within(samples: torch.Tensor, want: float, z: float = 5.0) -> tuple[bool, float]:
    se = float(samples.std()) / math.sqrt(len(samples))
    return abs(float(samples.mean()) - want) <= z * se, se


def test_oracle_is_a_bound_on_a_distribution():
    """The enumeration is an upper bound on -log p for a normalised p: sum_x exp(-NELBO(x)) <= 1, at both block
    sizes (a check of the oracle itself, with a margin: the bound is not loose by more than half)."""
    model = model_at(2)
    for m in (model, same_weights(model, 4)):
        mass = float(torch.exp(-enumerated_nelbo(m, ALL)).sum())
        assert 0.5 < mass <= 1.0 + 1e-9, mass


def test_validation_nelbo_is_unbiased_for_the_enumerated_nelbo():
    """30 seeds x (16 sequences x 32 copies): the mean total equals 32 x the sum of the 16 exact NELBOs, with the
    log-linear schedule (training's) and with the cosine one (the continuous-time bound does not depend on the
    schedule); the token count is 4 per sequence; the model's training mode is restored."""
    model = model_at(2).train()
    x = ALL.repeat(32, 1)
    exact = float(enumerated_nelbo(model.eval(), ALL).sum()) * 32
    model.train()
    lin = totals(model, [x], range(30))
    assert model.training
    ok, se = within(lin, exact)
    assert ok, (float(lin.mean()), exact, se)
    cos = totals(model, [x[:256], x[256:]], range(100, 130), schedule="cosine")
    ok, se_cos = within(cos, exact)
    assert ok, (float(cos.mean()), exact, se_cos)
    assert validation_nelbo(model, [x[:256], x[256:]], seed=0)[1] == 512 * L
    # power: the NELBO at block size 4 (a plausible mix-up of the evaluated block size) is > 10 SE away
    other = float(enumerated_nelbo(same_weights(model, 4), ALL).sum()) * 32
    assert abs(other - exact) > 10 * max(se, se_cos), (other, exact, se, se_cos)


def test_block_size_override_evaluates_the_nelbo_of_the_other_block_size():
    """Under block_size_override(model, 4) the estimate is unbiased for the enumerated NELBO of the same weights
    built at block size 4 (and > 10 SE from the block size 2 value); the block size is restored afterwards, and a
    block size that does not divide L is refused."""
    model = model_at(2)
    x = ALL.repeat(32, 1)
    exact4 = float(enumerated_nelbo(same_weights(model, 4), ALL).sum()) * 32
    exact2 = float(enumerated_nelbo(model, ALL).sum()) * 32
    with block_size_override(model, 4):
        assert model.config.block_size == 4
        est = totals(model, [x], range(200, 230))
    assert model.config.block_size == 2
    ok, se = within(est, exact4)
    assert ok, (float(est.mean()), exact4, se)
    assert abs(exact2 - exact4) > 10 * se, (exact2, exact4, se)
    with pytest.raises(ValueError, match="does not divide"):
        with block_size_override(model, 3):
            pass
    assert model.config.block_size == 2


def test_ignore_bos_leaves_position_zero_out_of_the_bound():
    """A model trained with ignore_bos: position 0 is clean context, never masked nor counted (3 tokens per
    sequence); the estimate is unbiased for that enumeration and > 10 SE from the all-positions one."""
    model = model_at(2, ignore_bos=True)
    x = ALL.repeat(32, 1)
    exact = float(enumerated_nelbo(model, ALL, ignore_first=True).sum()) * 32
    everything = float(enumerated_nelbo(model, ALL).sum()) * 32
    est = totals(model, [x], range(300, 330))
    ok, se = within(est, exact)
    assert ok, (float(est.mean()), exact, se)
    assert abs(everything - exact) > 10 * se
    assert validation_nelbo(model, [x], seed=0)[1] == 512 * (L - 1)


def nll_by_position(model, x: torch.Tensor, ar: bool) -> float:
    """AR: sum_{i>=1} -log p(x_i | x_{<i}) from the last logits of x_{<i}; block size 1: sum_{i>=0}
    -log p(x_i | x_{<i}, mask at i) from the last logits of [x_{<i}, mask]. One uncached forward per position."""
    total = 0.0
    for i in range(1 if ar else 0, x.shape[1]):
        ids = x[:, :i] if ar else torch.cat([x[:, :i], torch.full((x.shape[0], 1), MASK)], 1)
        total -= float(logprobs(model, ids)[:, -1].gather(-1, x[:, i : i + 1]).sum())
    return total


@pytest.mark.parametrize("kind", ["block_size_1", "ar"])
def test_exact_paths_equal_the_nll_position_by_position(kind):
    """Block size 1 and AR models have an exact NLL, so validation_nelbo is deterministic and equals the position-by-
    position NLL over two batches (16 and 5 sequences): L tokens per sequence at block size 1, L - 1 for AR."""
    ar = kind == "ar"
    model = model_at(1, causal=True, cross_attn=False, adaln=False) if ar else model_at(1)
    total, tokens = validation_nelbo(model, [ALL, ALL[:5]], seed=0)
    assert total == pytest.approx(nll_by_position(model, ALL, ar) + nll_by_position(model, ALL[:5], ar), rel=1e-5)
    assert tokens == 21 * (L - 1 if ar else L)
    assert validation_nelbo(model, [ALL, ALL[:5]], seed=1)[0] == pytest.approx(total, rel=1e-6)  # no noise
