"""SEDD's samplers in the block engine (bd3lm.sampling.score_rules) and infilling (bd3lm.sampling.infill).

Oracles: an enumeration of the one-token reverse chain with uncached forwards (block size 1 = exact AR over
per-token chains), a hand-written whole-sequence loop (block size L = the whole-sequence sampler), the identity
of Euler and analytic steps on absorbing + log-linear, and the clamping invariant of infilling.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import bd3lm
from bd3lm.sampling import generate
from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.registry import resolve_rule
from bd3lm.score_objectives import model_ratios
from tests.conftest import randomize, tiny_config

FAMILIES = [
    ("absorbing", "subs", None),
    ("absorbing", "score_entropy", None),
    ("uniform", "cedd", None),
    ("uniform", "score_entropy", None),
    ("roulette", "cedd", 0.7),
    ("roulette", "score_entropy", 0.7),
]


def _model(graph: str, loss: str, p_m, *, seed: int = 0, **kw) -> bd3lm.BD3LM:
    torch.manual_seed(seed)
    cfg = tiny_config(graph=graph, loss=loss, p_m=p_m, **kw)
    return randomize(bd3lm.BD3LM(cfg), seed, scale=0.3).eval()


def _one_token_law(model, rule, prefix: list[int]) -> torch.Tensor:
    """Distribution of the token a one-token block ends with after ``prefix``: the rule's chain enumerated state
    by state, each state's logits from an uncached forward of ``prefix + [state]`` (σ per token: 0 on the
    prefix, the step's σ on the block)."""
    graph = rule.graph
    v = model.config.vocab_size
    if graph.uses_mask:
        law = torch.zeros(v, dtype=torch.float64)
        law[graph.mask_index] = 1.0
    else:
        law = torch.ones(v, dtype=torch.float64) / graph.n_clean
        law[graph.mask_index] = 0.0
    for k in range(rule.n_calls):
        step = torch.zeros(v, v, dtype=torch.float64)
        for state in range(v):
            if law[state] == 0:
                continue
            x = torch.tensor([prefix + [state]])
            ts = torch.zeros(x.shape)
            ts[:, -1] = rule.timestep(k)
            with torch.no_grad():
                logits = model(input_ids=x, timesteps=ts if model.config.time_conditioning else None).logits[:, -1:]
            cur = torch.tensor([[state]])
            sigma = rule.sigma[min(k, rule.steps)]
            s = model_ratios(model, graph, logits, cur, sigma.expand(cur.shape))
            if k >= rule.steps:
                p = graph.denoise_probs(s, cur, sigma)
            else:
                p = rule.step_probs(s, cur, k)
            step[state] = p[0, 0]
        law = law @ step
    return law


@pytest.mark.parametrize(("graph", "loss", "p_m"), FAMILIES)
def test_block_size_one_is_exact_ar_over_one_token_chains(graph: str, loss: str, p_m) -> None:
    """L' = 1: the cached block sampler draws x1 ~ q(.|bos), x2 ~ q(.|bos, x1), q the one-token reverse chain
    (chi-square over the 16 joint outcomes of 4 clean tokens, 6000 samples)."""
    model = _model(graph, loss, p_m, vocab_size=5, model_length=4, block_size=1, time_conditioning=True)
    rule = resolve_rule(model, "analytic", 1, 2, None)
    q1 = _one_token_law(model, rule, [0])
    joint = torch.zeros(5, 5, dtype=torch.float64)
    for a in range(4):
        joint[a] = q1[a] * _one_token_law(model, rule, [0, a])
    n = 6000
    res = generate(model, torch.tensor([0]), 2, sampler="analytic", steps=2, num_samples=n, seed=3)
    counts = torch.zeros(5, 5, dtype=torch.float64)
    for seq in res.sequences:
        counts[int(seq[1]), int(seq[2])] += 1
    assert counts[4].sum() == 0 and counts[:, 4].sum() == 0  # the mask never comes out
    expected = joint[:4, :4].flatten() * n
    assert abs(float(joint.sum()) - 1.0) < 1e-9
    assert chisquare(counts[:4, :4].flatten().numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize(("graph", "loss", "p_m"), FAMILIES[1:4])
@pytest.mark.parametrize("sampler", ["analytic", "euler"])
def test_block_size_l_is_the_whole_sequence_sampler(graph: str, loss: str, p_m, sampler: str) -> None:
    """L' = L: generate() (cached engine) equals a hand-written whole-sequence loop, sample for sample."""
    model = _model(graph, loss, p_m, model_length=8, block_size=8, time_conditioning=True)
    res = generate(model, None, 8, sampler=sampler, steps=5, seed=11, num_samples=3)
    gen = torch.Generator().manual_seed(11)
    tok = TokenSampler(model.config.mask_index, generator=gen)
    rule = resolve_rule(model, sampler, 8, 5, None)
    x = torch.full((3, 8), model.config.mask_index)
    free = torch.ones_like(x, dtype=torch.bool)
    x = rule.init_block(x, free, tok)
    with torch.no_grad():
        for k in range(rule.n_calls):
            logits = model(input_ids=x, timesteps=torch.full((3,), rule.timestep(k))).logits
            x = rule.update(logits, x, free, k, tok)
    assert res.nfe == rule.n_calls
    assert torch.equal(torch.stack(res.sequences), x)


def test_absorbing_loglinear_euler_equals_analytic_in_the_engine() -> None:
    """On absorbing + log-linear the two predictors have the same step law (≤ 1e-12), so with one seed the
    float64 inverse-CDF draws give the same samples, at every block size."""
    for bs in (1, 4, 16):
        model = _model("absorbing", "score_entropy", None, block_size=bs)
        a = generate(model, torch.tensor([1, 2, 3]), 20, sampler="analytic", steps=3, seed=5, num_samples=4)
        e = generate(model, torch.tensor([1, 2, 3]), 20, sampler="euler", steps=3, seed=5, num_samples=4)
        assert all(torch.equal(x, y) for x, y in zip(a.sequences, e.sequences, strict=True))


@pytest.mark.parametrize(("graph", "loss", "p_m"), FAMILIES[1:4])
def test_score_rules_cache_equals_recompute(graph: str, loss: str, p_m) -> None:
    """The KV-cached engine (prefix at σ = 0, block at its σ) equals recomputing every window from scratch,
    past the training length too."""
    model = _model(graph, loss, p_m, block_size=4, time_conditioning=True)
    kw = dict(sampler="analytic", steps=2, seed=2, num_samples=2)
    a = generate(model, torch.tensor([1, 2, 3, 4, 5]), 30, **kw)
    b = generate(model, torch.tensor([1, 2, 3, 4, 5]), 30, kv_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))


@pytest.mark.parametrize(("graph", "loss", "p_m"), [FAMILIES[0], FAMILIES[2], FAMILIES[5]])
def test_infilling_never_changes_the_given_tokens(graph: str, loss: str, p_m) -> None:
    model = _model(graph, loss, p_m, block_size=16, time_conditioning=graph != "absorbing")
    prefix, suffix = torch.tensor([3, 1, 4, 1, 5]), [9, 2, 6]
    samplers = ["first_hitting", "ddpm", "confidence", "analytic", "euler"] if graph == "absorbing" else [
        "analytic", "euler"]
    for sampler in samplers:
        res = generate(model, prefix, 6, sampler=sampler, suffix=suffix, seed=0, num_samples=5)
        for seq in res.sequences:
            assert seq.shape == (14,)
            assert seq[:5].tolist() == prefix.tolist() and seq[11:].tolist() == suffix
            assert not bool((seq == model.config.mask_index).any())


def test_infilling_spends_no_call_on_a_step_that_reveals_nothing() -> None:
    """DDPM with 64 steps for a 4-token span: most steps reveal nothing, and the x they leave unchanged needs no
    new call, so a sample costs at most one call per revealed token (4), as in the block engine."""
    model = _model("absorbing", "subs", None, block_size=16)
    for seed in range(4):
        res = generate(model, torch.tensor([3, 1, 4]), 4, sampler="ddpm", steps=64, suffix=[9, 2], seed=seed)
        assert 1 <= res.nfe <= 4, res.nfe


def test_infilling_bad_input() -> None:
    block = _model("absorbing", "subs", None, block_size=4)
    with pytest.raises(ValueError, match="whole-sequence model"):
        generate(block, torch.tensor([1, 2]), 4, suffix=[3])
    whole = _model("absorbing", "subs", None, block_size=16)
    with pytest.raises(ValueError, match="exceed the model's length 16"):
        generate(whole, torch.tensor([1, 2]), 14, suffix=[3])
    with pytest.raises(ValueError, match="prefixes of one length"):
        generate(whole, [torch.tensor([1]), torch.tensor([1, 2])], 4, suffix=[3])
    uniform = _model("uniform", "cedd", None, block_size=16)
    with pytest.raises(ValueError, match="needs the absorbing graph"):
        generate(uniform, torch.tensor([1]), 4, sampler="ddpm")
    with pytest.raises(ValueError, match="top_k"):
        generate(uniform, torch.tensor([1]), 4, top_k=5)


def test_defaults_follow_the_model() -> None:
    """A time-conditioned network samples with the analytic rule by default (σ reaches it), a time-agnostic
    absorbing one with first-hitting; a rule instance re-reads the schedule of each model it is bound to; at
    temperature 0 the score rules are deterministic from an all-mask start (a uniform-graph block starts from a
    draw of its limit)."""
    tc = _model("absorbing", "score_entropy", None, time_conditioning=True)
    agnostic = _model("absorbing", "subs", None)
    assert resolve_rule(tc, None, 4, None, None).name == "analytic"
    assert resolve_rule(agnostic, None, 4, None, None).name == "first_hitting"
    from bd3lm.sampling.score_rules import AnalyticRule

    rule = AnalyticRule(steps=3)
    rule.bind(agnostic)
    assert rule.schedule.name == "loglinear"
    geo = _model("uniform", "cedd", None, noise_schedule="geometric")
    rule.bind(geo)
    assert rule.schedule.name == "geometric" and float(rule.sigma[0]) == pytest.approx(20.0, rel=1e-3)
    a = generate(tc, torch.tensor([1, 2]), 10, sampler="analytic", temperature=0.0, seed=1)
    b = generate(tc, torch.tensor([1, 2]), 10, sampler="analytic", temperature=0.0, seed=2)
    assert torch.equal(a.sequences[0], b.sequences[0])


def test_infilling_rejects_options_it_cannot_honour() -> None:
    whole = _model("absorbing", "subs", None, block_size=16)
    with pytest.raises(ValueError, match="stop_entropy, window do not apply to infilling"):
        generate(whole, torch.tensor([1, 2]), 4, suffix=[3], stop_entropy=3.0, window=16)
