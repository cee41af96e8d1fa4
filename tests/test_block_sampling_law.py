"""The law of a whole block of size L' = 2 under each absorbing update rule, against a brute-force enumeration.

Oracle: for a tiny random model (4 real tokens + the mask, L = 4, L' = 2) every state of the block — each of its
2 positions masked or holding one of the 4 tokens, 25 states — is run through an *uncached* plain forward of
``prefix + state`` (block-causal attention), giving ``p_theta(x0^j | state, prefix)`` with SUBS (mask logit -inf).
The probability of every final block is then the sum over every unmasking order / every set of positions revealed
per step / every token drawn, written from the rules' documented math (``bd3lm/sampling/first_hitting.py``,
``ddpm.py``, ``confidence.py``); the DDPM step schedule ``(alpha_s - alpha_t) / (1 - alpha_t)`` on the grid
``t_i = 1 - i / T`` is computed here from the schedules' closed forms (exact fractions for the log-linear one), not
by the sampler's code. The real sampler (``generate``: KV cache, temperature 1, top_p = 1) is run ``N`` times in one
batch and the empirical joint of the block's two tokens is chi-square tested against the enumeration.

Statistics: each chi-square test passes if ``p > 1e-3``, i.e. it fails falsely with probability 1e-3 for a correct
sampler (cells with expected count < 5 are pooled so the chi-square approximation holds). The seeds are fixed, so
every run is deterministic. Each test also checks its power: the same counts are rejected (``p < 1e-6``) against the
law of a plausible bug (both positions drawn from the all-mask call — no re-evaluation after a reveal — or another
rule's / another schedule's law).
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import product

import pytest
import torch
from conftest import tiny_model
from scipy.stats import chisquare

from bd3lm.sampling import DDPMRule, generate
from bd3lm.schedules import get_schedule

V, MASK, L, BS = 5, 4, 4, 2
REAL = tuple(range(MASK))
PROMPT = (1, 3)  # a clean first block: the sampler generates the second block
N = 8000
P_PASS, P_POWER = 1e-3, 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def small_model():
    """A tiny random two-layer model whose two block positions depend strongly on each other (query/key weights x3,
    value weights x2, head x1.5): the law of first hitting is at total variation 0.48 from drawing both tokens from
    the all-mask call."""
    model = tiny_model(4, vocab_size=V, model_length=L, block_size=BS, hidden_dim=16, n_heads=2, cond_dim=8)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            w, d = blk.attn_qkv.weight, blk.attn_qkv.weight.shape[1]
            w[: 2 * d].mul_(3.0)  # queries and keys
            w[2 * d :].mul_(2.0)  # values
        model.backbone.output_layer.linear.weight.mul_(1.5)
    return model


# -- the oracle --------------------------------------------------------------------------------------------------


def block_tables(model, prefix: tuple[int, ...]) -> dict[tuple[int, int], torch.Tensor]:
    """state (2 ids, MASK = masked) -> (2, V) float64 ``p_theta(x0^j | state, prefix)``: one uncached plain forward
    of ``prefix + state`` per state (SUBS: the mask gets probability 0)."""
    states = list(product(REAL + (MASK,), repeat=BS))
    ids = torch.tensor([list(prefix) + list(s) for s in states])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(prefix) :].double()
    logits[..., MASK] = -math.inf
    probs = logits.softmax(-1)
    return {s: probs[i] for i, s in enumerate(states)}


def first_hitting_law(P) -> torch.Tensor:
    """One reveal per step, the position uniform over the masked ones, its token ~ p(x0 | current state):
    P(a, b) = 1/2 p_0(a | mm) p_1(b | a m) + 1/2 p_1(b | mm) p_0(a | m b)."""
    law = torch.zeros(V, V, dtype=torch.float64)
    for a, b in product(REAL, repeat=2):
        law[a, b] = 0.5 * P[(MASK, MASK)][0, a] * P[(a, MASK)][1, b] + 0.5 * P[(MASK, MASK)][1, b] * P[(MASK, b)][0, a]
    return law


def parallel_law(P) -> torch.Tensor:
    """The law of a sampler that draws both positions from the all-mask call (a wrong law for every rule here)."""
    return torch.outer(P[(MASK, MASK)][0], P[(MASK, MASK)][1])


def ddpm_law(P, reveal: list[float]) -> torch.Tensor:
    """Step i reveals each masked position independently with probability ``reveal[i]``, each revealed position
    taking a token ~ p(x0 | state before the step); the recursion runs over every subset and every token."""
    law = torch.zeros(V, V, dtype=torch.float64)

    def walk(i: int, state: tuple[int, int], weight: float) -> None:
        masked = [j for j in range(BS) if state[j] == MASK]
        if not masked:
            law[state] += weight
            return
        r = reveal[i]
        for chosen in product([False, True], repeat=len(masked)):
            k = sum(chosen)
            w_sub = r**k * (1 - r) ** (len(masked) - k)
            if w_sub == 0:
                continue
            opened = [j for j, c in zip(masked, chosen, strict=True) if c]
            for toks in product(REAL, repeat=k):
                w_tok = 1.0
                nxt = list(state)
                for j, tok in zip(opened, toks, strict=True):
                    w_tok *= float(P[state][j, tok])
                    nxt[j] = tok
                walk(i + 1, tuple(nxt), weight * w_sub * w_tok)

    walk(0, (MASK, MASK), 1.0)
    return law


def loglinear_reveal(steps: int) -> list[float]:
    """(alpha_s - alpha_t) / (1 - alpha_t) with alpha_t = 1 - t, t = 1 - i/T, s = 1 - (i+1)/T, in exact fractions."""
    out = []
    for i in range(steps):
        t, s = 1 - Fraction(i, steps), 1 - Fraction(i + 1, steps)
        out.append(float(((1 - s) - (1 - t)) / t))
    return out


def cosine_reveal(steps: int) -> list[float]:
    """The same with alpha_t = cos(pi t / 2) (alpha_0 = 1, alpha_1 = 0: the last step reveals everything)."""
    out = []
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        a_t, a_s = math.cos(math.pi * t / 2), math.cos(math.pi * s / 2)
        out.append(1.0 if i == steps - 1 else (a_s - a_t) / (1 - a_t))
    return out


def confidence_law(P, tau: float) -> torch.Tensor:
    """Every masked position draws a candidate ~ p(x0 | state); its confidence is p(candidate); the positions with
    confidence >= tau are revealed, and always the most confident one. Enumerated over every candidate tuple."""
    law = torch.zeros(V, V, dtype=torch.float64)

    def walk(state: tuple[int, int], weight: float) -> None:
        masked = [j for j in range(BS) if state[j] == MASK]
        if not masked:
            law[state] += weight
            return
        for cands in product(REAL, repeat=len(masked)):
            conf = [float(P[state][j, c]) for j, c in zip(masked, cands, strict=True)]
            w = math.prod(conf)
            if w == 0:
                continue
            assert all(abs(c - tau) > 1e-4 for c in conf)  # no float-rounding ties at the threshold
            assert len(conf) < 2 or abs(conf[0] - conf[1]) > 1e-6  # and none for the argmax
            best = max(range(len(conf)), key=conf.__getitem__)
            nxt = list(state)
            for i, (j, c) in enumerate(zip(masked, cands, strict=True)):
                if conf[i] >= tau or i == best:
                    nxt[j] = c
            walk(tuple(nxt), weight * w)

    walk((MASK, MASK), 1.0)
    return law


def greedy_confidence_block(P, tau: float) -> tuple[int, int]:
    """Temperature 0: candidates are the argmaxes; the same reveal rule; a deterministic path."""
    state = (MASK, MASK)
    while MASK in state:
        masked = [j for j in range(BS) if state[j] == MASK]
        cands = [int(P[state][j].argmax()) for j in masked]
        conf = [float(P[state][j].max()) for j in masked]
        assert all(abs(c - tau) > 1e-4 for c in conf) and (len(conf) < 2 or abs(conf[0] - conf[1]) > 1e-6)
        best = max(range(len(conf)), key=conf.__getitem__)
        nxt = list(state)
        for i, (j, c) in enumerate(zip(masked, cands, strict=True)):
            if conf[i] >= tau or i == best:
                nxt[j] = c
        state = tuple(nxt)
    return state


# -- statistics ----------------------------------------------------------------------------------------------------


def chi2_pvalue(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square goodness of fit of ``counts`` to ``law`` (same shape), cells with expected count < 5 pooled."""
    counts, law = counts.flatten().double(), law.flatten().double()
    n = counts.sum()
    expected = law / law.sum() * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0  # an outcome of probability 0 was drawn
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def block_counts(model, prompt, n: int, seed: int, **kw) -> torch.Tensor:
    """Counts (V, V) of the generated 2-token block over ``n`` samples of one batched, cached ``generate`` run."""
    res = generate(model, [torch.tensor(prompt)], max_new_tokens=BS, num_samples=n, seed=seed, temperature=1.0,
                   top_p=1.0, kv_cache=True, **kw)
    pairs = torch.stack([s[len(prompt) :] for s in res.sequences])
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n, dtype=torch.float64), accumulate=True)
    return counts


# -- tests ---------------------------------------------------------------------------------------------------------


def test_oracle_laws_are_distributions_and_the_schedules_are_the_documented_ones():
    P = block_tables(small_model(), PROMPT)
    laws = [first_hitting_law(P), parallel_law(P), confidence_law(P, 0.5)]
    laws += [ddpm_law(P, r) for r in (loglinear_reveal(2), loglinear_reveal(3), cosine_reveal(3))]
    for law in laws:
        assert abs(float(law.sum()) - 1) < 1e-12 and float(law[MASK].sum() + law[:, MASK].sum()) == 0
    assert loglinear_reveal(3) == [1 / 3, 1 / 2, 1.0]  # 1 / (T - i) (the ddpm docstring's closed form)
    # T = 2, log-linear: a position is revealed at step 0 with prob 1/2, independently: both (1/4) or neither (1/4)
    # come from one call, exactly one (1/2) is first hitting, so the law is the midpoint of the two
    mid = 0.5 * first_hitting_law(P) + 0.5 * parallel_law(P)
    assert torch.allclose(ddpm_law(P, loglinear_reveal(2)), mid, atol=1e-15)


CASES = {
    # name: (generate kwargs, oracle law, the law of a plausible bug the counts must reject, samples)
    "first_hitting": (dict(sampler="first_hitting"), first_hitting_law, parallel_law, N),
    "ddpm-T2-loglinear": (dict(sampler="ddpm"), lambda P: ddpm_law(P, loglinear_reveal(2)), parallel_law, N),
    "ddpm-T3-loglinear": (
        dict(sampler="ddpm", steps=3),
        lambda P: ddpm_law(P, loglinear_reveal(3)),
        lambda P: ddpm_law(P, loglinear_reveal(2)),  # a wrong step grid
        N,
    ),
    "ddpm-T3-cosine": (
        dict(sampler=DDPMRule(3, schedule=get_schedule("cosine"))),
        lambda P: ddpm_law(P, cosine_reveal(3)),
        lambda P: ddpm_law(P, loglinear_reveal(3)),  # the schedule ignored: TV 0.03 only, hence 2 N samples
        2 * N,
    ),
    "confidence-0.5": (
        dict(sampler="confidence", threshold=0.5),
        lambda P: confidence_law(P, 0.5),
        first_hitting_law,  # the threshold ignored (one reveal per step)
        N,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_of_two_tokens_has_the_enumerated_law(case):
    model = small_model()
    kw, oracle, wrong, n = CASES[case]
    P = block_tables(model, PROMPT)
    law = oracle(P)
    counts = block_counts(model, PROMPT, n, seed=11, **kw)
    assert counts.sum() == n and counts[MASK].sum() == 0 and counts[:, MASK].sum() == 0
    p = chi2_pvalue(counts, law)
    p_wrong = chi2_pvalue(counts, wrong(P))
    tv = 0.5 * float((law - wrong(P)).abs().sum())
    print(f"{case}: chi-square p = {p:.3g}; against the wrong law (TV {tv:.3f}) p = {p_wrong:.3g}")
    assert p > P_PASS, (case, p)
    assert p_wrong < P_POWER, (case, p_wrong)  # the test has power against that bug


def test_first_hitting_law_of_a_whole_unconditional_sequence():
    """Both blocks from nothing: the first block's law from the empty prefix, the second's given the first (which
    the sampler reads back from its KV cache): a 256-cell joint, 20000 samples."""
    model = small_model()
    n = 20000
    first = block_tables(model, ())
    law1 = first_hitting_law(first)
    joint = torch.zeros(V, V, V, V, dtype=torch.float64)
    for a, b in product(REAL, repeat=2):
        joint[a, b] = law1[a, b] * first_hitting_law(block_tables(model, (a, b)))
    res = generate(model, None, max_new_tokens=L, num_samples=n, seed=5, sampler="first_hitting")
    seqs = torch.stack(res.sequences)
    assert seqs.shape == (n, L) and res.nfe == L
    counts = torch.zeros(V**4, dtype=torch.float64)
    counts.index_put_((((seqs[:, 0] * V + seqs[:, 1]) * V + seqs[:, 2]) * V + seqs[:, 3],),
                      torch.ones(n, dtype=torch.float64), accumulate=True)
    p = chi2_pvalue(counts, joint.flatten())
    # power: the law with the second block drawn independently of the first (a cache that lost the prefix)
    indep = (law1[:, :, None, None] * first_hitting_law(first)[None, None]).flatten()
    p_wrong = chi2_pvalue(counts, indep)
    print(f"unconditional L = 4: p = {p:.3g}; against a prefix-blind second block p = {p_wrong:.3g}")
    assert p > P_PASS and p_wrong < P_POWER


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.95])
def test_greedy_confidence_decoding_follows_the_oracle_path(tau):
    """Temperature 0: the block is a point mass per prefix; all 16 clean first blocks in one batch.

    (Not from an empty prefix: there both positions of the all-mask block see identical keys and values, so their
    confidences are equal up to float rounding and the argmax is a tie.)"""
    model = small_model()
    prefixes = list(product(REAL, repeat=2))
    res = generate(model, [torch.tensor(p) for p in prefixes], max_new_tokens=BS, sampler="confidence",
                   threshold=tau, temperature=0.0, seed=0)
    want = [list(p) + list(greedy_confidence_block(block_tables(model, p), tau)) for p in prefixes]
    assert [s.tolist() for s in res.sequences] == want
    # the check has teeth: the blocks differ across prefixes, and above tau = 0.3 (where both argmaxes clear the
    # threshold at the first call for every prefix) decoding both positions from the all-mask call — no
    # re-evaluation after the first reveal — gives other blocks for 3 of the 16 prefixes
    assert len({tuple(w[2:]) for w in want}) > 1
    one_call = [list(p) + [int(block_tables(model, p)[(MASK, MASK)][j].argmax()) for j in range(BS)] for p in prefixes]
    assert sum(a != b for a, b in zip(one_call, want, strict=True)) == (0 if tau == 0.3 else 3)
