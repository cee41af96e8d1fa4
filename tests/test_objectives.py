import math
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import bd3lm
from bd3lm.noise import sample_mask
from bd3lm.objectives import ar_loss, diffusion_loss, nelbo, stratified_t
from bd3lm.schedules import get_schedule


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread each (the machine is shared; conftest's module-scoped fixture restores it)."""


def data(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size - 1, (batch, cfg.model_length), generator=g)


def seq_logprobs(model, prefix, block):
    """log p over the vocabulary at every position of ``block`` from a plain block-causal pass on [prefix; block]."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prefix, block], 1)).logits[:, prefix.shape[1]:].double()
    logits[..., model.config.mask_index] = -math.inf
    return logits.log_softmax(-1)


def test_block_size_one_all_masked_is_the_autoregressive_nll():
    model = tiny_model(block_size=1)
    x0 = data(model.config)
    with torch.no_grad():
        out = diffusion_loss(model, x0, interval=(1.0, 1.0))
    m = model.config.mask_index
    ref = torch.zeros(2, dtype=torch.float64)
    for i in range(16):
        lp = seq_logprobs(model, x0[:, :i], torch.full((2, 1), m))
        ref -= lp[:, 0].gather(-1, x0[:, i : i + 1]).squeeze(-1)
    assert (out.nll_per_seq.double() - ref).abs().max().item() <= 1e-5 * 16
    assert out.loss.item() == pytest.approx(ref.sum().item() / 32, abs=1e-5)


def test_block_size_l_is_the_mdlm_loss():
    model = tiny_model(block_size=16)
    x0 = data(model.config, batch=4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = diffusion_loss(model, x0, generator=g1)
        # MDLM by hand: same draws, one t per sequence, bidirectional pass on x_t, weight 1/t on masked tokens.
        t = stratified_t(4, 1, (1e-3, 1.0), g2)
        masked = sample_mask(4, 16, 16, t, get_schedule("loglinear"), generator=g2)
        xt = torch.where(masked, model.config.mask_index, x0)
        logits = model(input_ids=xt).logits.float()
    logits[..., model.config.mask_index] = -math.inf
    nll = -logits.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    ref = (torch.where(masked, nll, 0.0) / t).sum() / 64
    assert abs(out.loss.item() - ref.item()) <= 1e-6


def test_subs_unmasked_positions_contribute_zero_and_mask_gets_no_probability():
    model = tiny_model(block_size=4)
    x0 = data(model.config)
    t = torch.tensor([[1e-9, 1.0, 1e-9, 0.5], [1.0, 1e-9, 1e-9, 1e-9]])
    with torch.no_grad():
        out = diffusion_loss(model, x0, t=t, generator=torch.Generator().manual_seed(0))
    untouched = t < 1e-6  # P(any mask) = 4e-9: these blocks are clean and must contribute exactly 0
    assert torch.equal(out.per_block[untouched], torch.zeros(int(untouched.sum())))
    assert (out.per_block[t == 1.0] > 0).all()
    from bd3lm.objectives import masked_cross_entropy

    logits = torch.randn(5, 33)
    target = torch.full((5,), 32)  # the mask token itself is impossible under SUBS
    assert torch.isinf(masked_cross_entropy(logits, target, 32)).all()


def exact_nelbo(model, x0):
    """Σ_b Σ_{S ⊆ block} c_b(S) ∫ (1/t) t^k (1-t)^{L'-k} dt = Σ c_b(S) B(k, L'-k+1), enumerated exactly."""
    bs, m = model.config.block_size, model.config.mask_index
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for b in range(x0.shape[1] // bs):
        blk = x0[:, b * bs : (b + 1) * bs]
        for pattern in product([0, 1], repeat=bs):
            k = sum(pattern)
            if k == 0:
                continue
            s = torch.tensor(pattern, dtype=torch.bool)
            lp = seq_logprobs(model, x0[:, : b * bs], torch.where(s, m, blk))
            c = -(lp.gather(-1, blk[..., None]).squeeze(-1) * s).sum(-1)
            beta = math.exp(math.lgamma(k) + math.lgamma(bs - k + 1) - math.lgamma(bs + 1))
            total += c * beta
    return total


def test_nelbo_is_unbiased_against_exact_enumeration():
    model = tiny_model(block_size=4)
    x0 = data(model.config)
    exact = exact_nelbo(model, x0)
    g = torch.Generator().manual_seed(0)
    reps = torch.stack([nelbo(model, x0, num_samples=25, generator=g).double() for _ in range(40)])
    mean, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
    assert ((mean - exact).abs() <= 3 * se).all(), (mean, exact, se)
    assert (se < 0.05 * exact).all()  # the test has power: the standard error is small


def test_nelbo_of_an_ar_model_is_its_exact_nll():
    model = tiny_model(causal=True, cross_attn=False, adaln=False, block_size=1)
    x0 = data(model.config)
    with torch.no_grad():
        logits = model(input_ids=x0).logits[:, :-1].float()
    logits[..., model.config.mask_index] = -math.inf
    ref = F.cross_entropy(logits.reshape(-1, 33), x0[:, 1:].reshape(-1), reduction="none").view(2, -1).sum(1)
    assert torch.allclose(nelbo(model, x0), ref, atol=1e-5)
    assert ar_loss(model, x0).n_tokens == 30


#: (alpha_t, d alpha_t / dt) of every masking schedule, written here from the formulas (independent of
#: bd3lm.schedules): log-linear 1 - t, linear exp(-sigma_max t) with sigma_max = -log(1e-3), cosine cos(pi t / 2),
#: square 1 - t^2, square root 1 - sqrt(t), log 1 - log(1 + t) / log 2.
ALPHA = {
    "loglinear": (lambda t: 1 - t, lambda t: -1.0),
    "linear": (lambda t: 1e-3**t, lambda t: math.log(1e-3) * 1e-3**t),
    "cosine": (lambda t: math.cos(math.pi * t / 2), lambda t: -math.pi / 2 * math.sin(math.pi * t / 2)),
    "square": (lambda t: 1 - t * t, lambda t: -2 * t),
    "square_root": (lambda t: 1 - math.sqrt(t), lambda t: -0.5 / math.sqrt(t)),
    "log": (lambda t: 1 - math.log1p(t) / math.log(2), lambda t: -1 / ((1 + t) * math.log(2))),
}


def pattern_costs(model, x):
    """[(block, mask pattern, c)] over every non-empty pattern of every block of the one sequence ``x`` (1, L):
    c = sum over the masked positions of -log p(x^l | block with that pattern masked, x^{<b}), uncached forwards."""
    bs, m = model.config.block_size, model.config.mask_index
    out = []
    for b in range(x.shape[1] // bs):
        blk = x[:, b * bs : (b + 1) * bs]
        for pattern in product([0, 1], repeat=bs):
            if sum(pattern):
                s = torch.tensor(pattern, dtype=torch.bool)
                lp = seq_logprobs(model, x[:, : b * bs], torch.where(s, m, blk))
                out.append((b, pattern, float(-(lp.gather(-1, blk[..., None]).squeeze(-1) * s).sum())))
    return out


def expected_loss_at(name, t, costs, bs):
    """E over masks of the sequence's weighted loss at a fixed t: w(t) sum_S u^k (1-u)^(L'-k) c(S), u = 1 - alpha_t,
    w = -alpha'_t / u."""
    alpha, d_alpha = ALPHA[name]
    u = 1 - alpha(t)
    w = -d_alpha(t) / u
    return w * sum(u ** sum(p) * (1 - u) ** (bs - sum(p)) * c for _, p, c in costs)


def expected_clipped_loss(name, lo, hi, costs, bs, nodes=64):
    """E of the clipped objective: t ~ U[lo, hi]; a block's masked count ~ Binomial(L', u_t) truncated to the counts
    k with u_lo <= k / L' <= u_hi, the masked set uniform among those of that size; weight w(t) unchanged. The t
    integral by 64-node Gauss-Legendre (the integrand is smooth on [lo, hi])."""
    alpha, d_alpha = ALPHA[name]
    u_lo, u_hi = 1 - alpha(lo), 1 - alpha(hi)
    feasible = [k for k in range(bs + 1) if u_lo - 1e-6 <= k / bs <= u_hi + 1e-6]
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for x, wq in zip(lo + (hi - lo) * (xs + 1) / 2, ws, strict=True):
        u = 1 - alpha(x)
        pk = {k: math.comb(bs, k) * u**k * (1 - u) ** (bs - k) for k in feasible}
        z = sum(pk.values())
        inner = sum(pk[sum(p)] / z / math.comb(bs, sum(p)) * c for _, p, c in costs if sum(p) in pk)
        total += wq / 2 * (-d_alpha(x) / u) * inner
    return total


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_every_schedule_gives_the_enumerated_expected_loss(name):
    """diffusion_loss with each schedule, at fixed t (unclipped: Bernoulli(1 - alpha_t) masks) and on the clipped
    interval [0.1, 0.9] (truncated-binomial masks), against the enumerated expectation over every mask pattern.

    2000 copies of one sequence (L = 8, L' = 4): the mean per-sequence loss must be within 4 standard errors of the
    oracle (SE from the rows' sample SD; conservative when t is stratified across rows). Per check the false-failure
    probability is 6e-5 (normal approximation), 2.5e-4 per schedule. Power: the oracle of a wrong schedule (the
    log-linear one; square for log-linear) lies > 8 SE away at some check. The schedule's own alpha, alpha' and
    weight are also checked against the closed forms above (alpha' of which against a central difference)."""
    sched = get_schedule(name)
    alpha, d_alpha = ALPHA[name]
    for t in (0.05, 0.3, 0.7, 0.95):
        h = 1e-6
        assert d_alpha(t) == pytest.approx((alpha(t + h) - alpha(t - h)) / (2 * h), rel=1e-6)
        tt = torch.tensor([t], dtype=torch.float64)
        assert float(sched.alpha(tt)) == pytest.approx(alpha(t), rel=1e-12, abs=1e-15)
        assert float(sched.alpha_prime(tt)) == pytest.approx(d_alpha(t), rel=1e-12)
        assert float(sched.weight(tt)) == pytest.approx(-d_alpha(t) / (1 - alpha(t)), rel=1e-10)

    model = tiny_model(3, vocab_size=5, model_length=8, block_size=4)
    x = torch.tensor([[0, 3, 1, 1, 2, 0, 3, 2]])
    costs = pattern_costs(model, x)
    rows, bs = 2000, 4
    wrong = "square" if name == "loglinear" else "loglinear"
    power = []
    with torch.no_grad():
        for t in (0.2, 0.5, 0.9, None):
            g = torch.Generator().manual_seed(1)
            if t is None:
                out = diffusion_loss(model, x.expand(rows, -1), schedule=name, interval=(0.1, 0.9), generator=g)
                want, alt = (expected_clipped_loss(n, 0.1, 0.9, costs, bs) for n in (name, wrong))
            else:
                out = diffusion_loss(model, x.expand(rows, -1), schedule=name, t=torch.full((rows, 2), t), generator=g)
                want, alt = (expected_loss_at(n, t, costs, bs) for n in (name, wrong))
            v = out.nll_per_seq.double()
            se = float(v.std()) / math.sqrt(rows)
            assert abs(float(v.mean()) - want) <= 4 * se, (name, t, float(v.mean()), want, se)
            power.append(abs(alt - want) / se)
    assert max(power) > 8, power


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_every_schedule_trains_a_constant_sequence(name):
    """8 AdamW steps on copies of a constant sequence with each schedule's loss: the exact NELBO (enumerated, and
    schedule-free: sum_S c(S) B(k, L'-k+1)) falls from its closed-form start L log(V - 1) (the official zero-init
    head predicts the uniform law over the real tokens) to below 1% of it."""
    torch.manual_seed(0)
    cfg = bd3lm.BD3LMConfig(vocab_size=5, model_length=8, block_size=4, hidden_dim=32, cond_dim=16, n_blocks=2,
                            n_heads=4, dropout=0.0)
    model = bd3lm.BD3LM(cfg)
    x = torch.full((1, 8), 2)

    def exact():
        model.eval()
        return sum(c * math.gamma(sum(p)) * math.gamma(5 - sum(p)) / math.gamma(5) for _, p, c in
                   pattern_costs(model, x))

    before = exact()
    assert before == pytest.approx(8 * math.log(4), rel=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(8):
        opt.zero_grad()
        diffusion_loss(model, x.expand(16, -1), schedule=name, generator=g).loss.backward()
        opt.step()
    after = exact()
    assert math.isfinite(after) and after < 0.01 * before, (name, before, after)


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_overfitting_drives_the_nelbo_down(bs):
    torch.manual_seed(0)
    cfg = bd3lm.BD3LMConfig(vocab_size=17, model_length=16, block_size=bs, hidden_dim=64, cond_dim=32, n_blocks=2,
                            n_heads=4, dropout=0.0, cross_attn=bs < 16)
    model = bd3lm.BD3LM(cfg)
    x0 = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(3)).repeat(4, 1)
    g = torch.Generator().manual_seed(0)
    before = nelbo(model.eval(), x0[:2], num_samples=64, generator=g).mean().item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        opt.zero_grad()
        diffusion_loss(model, x0, generator=g).loss.backward()
        opt.step()
    # 64 draws: with 8 the estimate's own noise (heavy 1/t weights) can hide a 5x drop on some CPUs
    after = nelbo(model.eval(), x0[:2], num_samples=64, generator=g).mean().item()
    assert after < before / 5, (before, after)


def test_bad_input_is_one_line():
    model = tiny_model(block_size=4)
    x0 = data(model.config)
    cases = [
        (dict(interval=(0.4, 0.45)), "admits no whole number of masked tokens"),
        (dict(interval=(0.8, 0.3)), "beta > omega"),
        (dict(interval=(-0.1, 0.5)), r"must lie in \[0, 1\]"),
        (dict(t=torch.full((2, 4), 1.5)), r"values in \[0, 1\]"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            diffusion_loss(model, x0, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="sequence length 14 is not a multiple of block_size 4"):
        diffusion_loss(model, x0[:, :14])
    with pytest.raises(ValueError, match="non-empty"):
        diffusion_loss(model, x0[:0])
    with pytest.raises(ValueError, match="contains the mask token id 32"):
        diffusion_loss(model, torch.full((1, 16), 32))


def test_official_default_interval_is_the_full_range_and_short_sequences_work():
    from bd3lm.objectives import _is_full_range

    assert _is_full_range((1e-3, 0.999)) and not _is_full_range((1e-3, 0.9))
    model = tiny_model(block_size=1)
    out = diffusion_loss(model, data(model.config), interval=(1e-3, 0.999), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    model = tiny_model(block_size=4)
    x0 = data(model.config)[:, :8]  # evaluation at a length other than model_length
    assert nelbo(model, x0, num_samples=2, generator=torch.Generator().manual_seed(0)).shape == (2,)
