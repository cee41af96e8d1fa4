"""eval.ppl's estimator (bd3lm.evaluation.likelihood) against independent oracles: a token-by-token exact NLL and
an exact enumeration of every mask pattern with closed-form time integrals."""

import math
from itertools import product

import pytest
import torch
from conftest import tiny_model

from bd3lm.evaluation import likelihood
from bd3lm.objectives import diffusion_loss, nelbo


def data(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size - 1, (batch, cfg.model_length), generator=g)


def logprobs(model, ids):
    """float64 log-probabilities at every position of a plain (block-causal / causal) pass, mask excluded."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logits[..., model.config.mask_index] = -math.inf
    return logits.log_softmax(-1)


def ar_oracle(model, x0):
    """Σ_{i>=1} -log p(x_i | x_{<i}), one causal forward per prefix."""
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for i in range(1, x0.shape[1]):
        lp = logprobs(model, x0[:, :i])[:, -1]
        total -= lp.gather(-1, x0[:, i : i + 1]).squeeze(-1)
    return total


def l1_oracle(model, x0, first=0):
    """Block size 1: Σ_{i>=first} -log p(x_i | x_{<i}, x_t^i = mask), one forward per position."""
    m = model.config.mask_index
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for i in range(first, x0.shape[1]):
        ids = torch.cat([x0[:, :i], torch.full((x0.shape[0], 1), m)], 1)
        total -= logprobs(model, ids)[:, -1].gather(-1, x0[:, i : i + 1]).squeeze(-1)
    return total


def tail_integral(k: int, n: int, a: float) -> float:
    """∫_a^1 (1/t) t^k (1-t)^n dt = Σ_j C(n,j) (-1)^j (1 - a^{k+j}) / (k+j), exactly (binomial expansion)."""
    return sum(math.comb(n, j) * (-1) ** j * (1 - a ** (k + j)) / (k + j) for j in range(n + 1))


def enumerated_nelbo(model, x0, t_min=0.0, first=False):
    """The NELBO as a finite sum: every mask pattern of every block, its probability integrated over t exactly
    (density 1 / (1 - t_min) on [t_min, 1]); with ``first`` position 0 is never masked nor counted."""
    bs, m = model.config.block_size, model.config.mask_index
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for b in range(x0.shape[1] // bs):
        blk = x0[:, b * bs : (b + 1) * bs]
        free = [j for j in range(bs) if not (first and b == 0 and j == 0)]
        for pattern in product([0, 1], repeat=len(free)):
            k = sum(pattern)
            if k == 0:
                continue
            s = torch.zeros(bs, dtype=torch.bool)
            s[[free[i] for i, p in enumerate(pattern) if p]] = True
            lp = logprobs(model, torch.cat([x0[:, : b * bs], torch.where(s, m, blk)], 1))[:, b * bs :]
            c = -(lp.gather(-1, blk[..., None]).squeeze(-1) * s).sum(-1)
            total += c * tail_integral(k, len(free) - k, t_min) / (1 - t_min)
    return total


def test_ar_likelihood_is_the_exact_nll():
    model = tiny_model(causal=True, cross_attn=False, adaln=False, block_size=1)
    x0 = data(model.config, batch=5)
    res = likelihood(model, x0, batch_size=2)
    ref = ar_oracle(model, x0) / 15
    assert res.exact and res.tokens_per_sequence == 15 and res.n_tokens == 75
    assert torch.allclose(torch.tensor(res.per_sequence, dtype=torch.float64), ref, atol=1e-6)
    assert res.nll == pytest.approx(ref.mean().item(), abs=1e-6)
    assert res.se == pytest.approx((ref.std() / math.sqrt(5)).item(), rel=1e-4)
    assert res.ppl == pytest.approx(math.exp(ref.mean().item()), rel=1e-6)


@pytest.mark.parametrize("first", [False, True])
def test_block_size_one_is_exact_with_zero_variance(first):
    model = tiny_model(block_size=1)
    x0 = data(model.config)
    a = likelihood(model, x0, seed=0, ignore_first=first)
    b = likelihood(model, x0, seed=123, num_samples=7, ignore_first=first)
    ref = l1_oracle(model, x0, first=int(first)) / (16 - int(first))
    assert a.exact and a.per_sequence == b.per_sequence  # no Monte-Carlo variance at all
    assert torch.allclose(torch.tensor(a.per_sequence, dtype=torch.float64), ref, atol=1e-6)
    assert a.tokens_per_sequence == 16 - int(first)
    # the Monte-Carlo bound estimates the same number (log-linear schedule): within 4 standard errors
    mc = torch.stack([nelbo(model, x0, num_samples=20, exact=False, ignore_first=first,
                            generator=torch.Generator().manual_seed(s)).double() for s in range(30)])
    se = mc.std(0) / math.sqrt(30)
    assert ((mc.mean(0) - ref * (16 - int(first))).abs() <= 4 * se).all()


@pytest.mark.parametrize("protocol,t_min,first", [("full", 0.0, False), ("official", 1e-3, True)])
def test_monte_carlo_interval_contains_the_enumerated_nelbo(protocol, t_min, first):
    model = tiny_model(block_size=4)
    x = data(model.config, batch=1)
    exact = enumerated_nelbo(model, x, t_min=t_min, first=first).item() / (16 - int(first))
    chunks = x.repeat(400, 1)  # one sequence many times: the interval is the Monte-Carlo uncertainty alone
    res = likelihood(model, chunks, protocol=protocol, num_samples=2, batch_size=200, seed=0)
    assert res.t_range == (t_min, 1.0) and res.ignore_first == first and not res.exact
    lo, hi = res.ci95
    assert lo <= exact <= hi, (lo, exact, hi)
    assert hi - lo < 0.25 * exact  # the interval is informative


def test_official_range_differs_from_the_full_range_by_the_truncation():
    model = tiny_model(block_size=4)
    x = data(model.config, batch=2)
    full, off = enumerated_nelbo(model, x), enumerated_nelbo(model, x, t_min=1e-3)
    assert not torch.allclose(full, off, rtol=1e-6)  # the oracle distinguishes the two protocols


def test_ignore_first_scores_exactly_l_minus_one_positions():
    model = tiny_model(block_size=4)
    x0 = data(model.config)
    m = model.config.mask_index
    with torch.no_grad():
        out = diffusion_loss(model, x0, interval=(1.0, 1.0), ignore_first=True)
    assert out.n_tokens == 3 * 15
    # oracle: block 0 is [x_0, m, m, m] (position 0 clean, not counted), later blocks fully masked
    ref = torch.zeros(3, dtype=torch.float64)
    for b in range(4):
        blk = torch.full((3, 4), m)
        if b == 0:
            blk[:, 0] = x0[:, 0]
        lp = logprobs(model, torch.cat([x0[:, : 4 * b], blk], 1))[:, 4 * b :]
        nll = -lp.gather(-1, x0[:, 4 * b : 4 * b + 4, None]).squeeze(-1)
        ref += nll[:, 1:].sum(-1) if b == 0 else nll.sum(-1)
    assert torch.allclose(out.nll_per_seq.double(), ref, atol=1e-5)
    res = likelihood(model, x0, ignore_first=True)
    assert res.tokens_per_sequence == 15 and res.n_tokens == 45


def test_a_model_trained_with_ignore_bos_is_evaluated_that_way():
    model = tiny_model(block_size=4)
    model.config.ignore_bos = True
    assert likelihood(model, data(model.config)).ignore_first
    assert not likelihood(model, data(model.config), ignore_first=False).ignore_first


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_samples=0), "num_samples (K) must be an integer >= 1; got 0"),
        (dict(protocol="paper"), "protocol must be one of full, official; got 'paper'"),
        (dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
        (dict(exact=True), "exact NLL needs a causal model or block_size 1; got block_size 4"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, msg):
    model = tiny_model(block_size=4)
    with pytest.raises(ValueError) as e:
        likelihood(model, data(model.config), **kw)
    assert str(e.value) == msg


def test_bad_chunks_are_one_line_errors():
    model = tiny_model(block_size=4)
    with pytest.raises(ValueError, match=r"^chunks have length 8; the model's model_length is 16$"):
        likelihood(model, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^chunks must hold integer token ids; got dtype torch.float32$"):
        likelihood(model, torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1; got 0"):
        nelbo(model, data(model.config), num_samples=0)
