"""Sampler tests: cache exactness, batching, block size 1 = ancestral sampling, NFE, windows, stopping,
filters."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from bd3lm.sampling import (
    BlockRule,
    ConfidenceRule,
    DDPMRule,
    TokenSampler,
    generate,
    top_k_filter,
    top_p_filter,
)
from bd3lm.sampling.first_hitting import FirstHittingRule
from bd3lm.sampling.layout import column_layout, default_stride, window_start
from bd3lm.sampling.processing import sample_categorical

AR_KW = dict(causal=True, cross_attn=False, adaln=False, block_size=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def sharp_model(seed: int = 0, gain: float = 4.0, **kw):
    """A tiny random model whose predictions depend more on the context (zero head bias, larger head
    weight)."""
    model = tiny_model(seed, **kw)
    with torch.no_grad():
        model.backbone.output_layer.linear.bias.zero_()
        model.backbone.output_layer.linear.weight.mul_(gain)
    return model


def recorder():
    calls = []
    return calls, (lambda ids, logits: calls.append((list(ids), logits.clone())))


def prompts(*lengths, seed=0, vocab=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


# -- cache exactness
# ------------------------------------------------------------------------------------------


CASES = {
    "bd3-L4": dict(model=dict(block_size=4), gen=dict()),
    "bd3-L4-stride8": dict(model=dict(block_size=4), gen=dict(window_stride=8)),
    "bd3-L2-window12": dict(model=dict(block_size=2), gen=dict(window=14, window_stride=4)),
    "bd3-L1": dict(model=dict(block_size=1), gen=dict(window_stride=3)),
    "mdlm-L16": dict(model=dict(block_size=16), gen=dict()),
    "ar": dict(model=AR_KW, gen=dict(window_stride=5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sampler", ["first_hitting", "confidence"])
def test_cache_equals_full_recompute_past_the_window(case, sampler):
    if case == "mdlm-L16" and sampler == "confidence":
        # past the window an L' = L model sees only its all-mask block, whose positions get confidences equal to
        # 1e-8: the greedy argmax is then decided by float rounding, a tie rather than a difference of paths
        pytest.skip("ties in the confidence argmax")
    spec = CASES[case]
    model = tiny_model(**spec["model"])
    kw = dict(max_new_tokens=44, sampler=sampler, seed=3, **spec["gen"])
    if sampler == "confidence":
        kw.update(temperature=0.0, threshold=0.5)
    batch = prompts(7, 2, 13)
    out = {}
    for cache in (True, False):
        calls, hook = recorder()
        res = generate(model, batch, kv_cache=cache, on_logits=hook, **kw)
        out[cache] = (res, calls)
    (r1, c1), (r0, c0) = out[True], out[False]
    assert [s.tolist() for s in r1.sequences] == [s.tolist() for s in r0.sequences]
    assert len(c1) == len(c0) > 0
    worst = max((a[1] - b[1]).abs().max().item() for a, b in zip(c1, c0, strict=True))
    assert all(a[0] == b[0] for a, b in zip(c1, c0, strict=True))
    assert worst <= 1e-5, worst
    # past model_length: 44 new tokens after a 13-token prompt with a 16-token model, so the window slid
    assert max(len(s) for s in r1.sequences) > 3 * model.config.model_length


def test_cache_exact_for_a_single_unconditional_sequence_far_past_the_window():
    model = sharp_model(block_size=4)
    logs = {}
    for cache in (True, False):
        calls, hook = recorder()
        res = generate(
            model, None, max_new_tokens=64, kv_cache=cache, seed=1, on_logits=hook, sampler="ddpm", steps=6
        )
        logs[cache] = (res.sequences[0].tolist(), calls)
    assert logs[True][0] == logs[False][0]
    worst = max((a[1] - b[1]).abs().max().item() for a, b in zip(logs[True][1], logs[False][1], strict=True))
    scale = max(b[1].abs().max().item() for b in logs[False][1])  # about 17: a few float32 ulps is 1e-5
    assert worst <= 1e-6 * max(scale, 10.0), (worst, scale)


# -- batching
# ---------------------------------------------------------------------------------------------------


def _per_sequence(calls, n):
    seqs = [[] for _ in range(n)]
    for ids, logits in calls:
        for r, sid in enumerate(ids):
            seqs[sid].append(logits[r])
    return seqs


def _is_subsequence(needles, haystack, atol):
    """Every tensor of ``needles`` appears, in order, in ``haystack`` (to ``atol``)."""
    it = iter(haystack)
    return all(any(torch.allclose(n, h, atol=atol, rtol=0) for h in it) for n in needles)


@pytest.mark.parametrize("model_kw", [dict(block_size=4), AR_KW], ids=["bd3", "ar"])
@pytest.mark.parametrize("window_stride", [None, 8])
def test_batch_invariance_of_deterministic_decoding(model_kw, window_stride):
    model = sharp_model(seed=2, **model_kw)
    batch = prompts(1, 6, 11, 3, seed=5)
    kw = dict(
        max_new_tokens=37, sampler="confidence", temperature=0.0, threshold=0.6, window_stride=window_stride
    )
    calls, hook = recorder()
    together = generate(model, batch, on_logits=hook, **kw)
    together_logits = _per_sequence(calls, len(batch))
    for i, p in enumerate(batch):
        calls, hook = recorder()
        alone = generate(model, [p], on_logits=hook, **kw)
        assert together.sequences[i].tolist() == alone.sequences[0].tolist(), i
        # every network output of the lone run is seen by the batched run (which also evaluates a sequence
        # whose
        # block is finished while others are not); logits are O(10), so 1e-4 is float32 noise
        assert _is_subsequence(_per_sequence(calls, 1)[0], together_logits[i], atol=1e-4)
        assert together.sequences[i][: len(p)].tolist() == p.tolist()


def test_default_stride_is_half_the_window_in_whole_blocks():
    assert default_stride(1024, 4, streaming=False) == 512  # the official long-sample protocol at L = 1024
    assert default_stride(1024, 1, streaming=False) == 512
    assert default_stride(24, 8, streaming=False) == 8  # 12 rounded down to whole blocks
    assert default_stride(16, 16, streaming=False) == 16  # at least one block
    assert default_stride(1024, 4, streaming=True) == 4  # streaming never re-encodes: the most context


def test_column_layout_and_window_policy():
    nb, pads, rems = column_layout([0, 3, 4, 9], 4)
    assert (nb, pads, rems) == (2, [8, 8, 4, 0], [0, 3, 0, 1])
    pad = torch.tensor([0, 4, 8])
    # inputs end at column 24 with W = 16: own ends 24, 20, 16 -> starts 8, 4, 0 (stride 4) or 8, 8, 0 (stride
    # 8)
    assert window_start(24, pad, 16, 4).tolist() == [8, 8, 8]
    assert window_start(24, pad, 16, 8).tolist() == [8, 12, 8]


def test_prompt_tail_fills_the_first_block_and_is_never_changed():
    model = sharp_model(block_size=4)
    p = torch.tensor([5, 6, 7, 8, 9, 10])  # ends inside block 1: positions 4, 5 are given
    res = generate(model, [p], max_new_tokens=6, seed=0)
    assert res.sequences[0][:6].tolist() == p.tolist() and len(res.sequences[0]) == 12
    mdlm = sharp_model(block_size=16)
    res = generate(mdlm, [p], max_new_tokens=10, seed=0, sampler="ddpm", steps=4)
    assert res.sequences[0][:6].tolist() == p.tolist() and len(res.sequences[0]) == 16


# -- block size 1 == ancestral sampling
# -------------------------------------------------------------------------


def _exact_two_token_joint(model, prompt):
    """p(x1, x2 | prompt) of ancestral sampling from the network (mask token excluded, SUBS)."""
    cfg = model.config
    m, v = cfg.mask_index, cfg.vocab_size

    def next_probs(ctx):
        with torch.no_grad():
            if cfg.causal:
                logits = model(input_ids=torch.tensor([ctx])).logits[0, -1]
            else:
                logits = model(input_ids=torch.tensor([ctx + [m]])).logits[0, -1]
        logits = logits.double()
        logits[m] = -math.inf
        return torch.softmax(logits, -1)

    p1 = next_probs(prompt)
    joint = torch.zeros(v, v, dtype=torch.float64)
    for a in range(v):
        if a != m:
            joint[a] = p1[a] * next_probs(prompt + [a])
    return joint


def _chi_square_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize(
    "model_kw,sampler,extra",
    [
        (dict(block_size=1), "first_hitting", {}),
        (dict(block_size=1), "ddpm", {}),
        (dict(block_size=1), "ddpm", dict(steps=3)),
        (dict(block_size=1), "confidence", dict(threshold=0.5)),
        (AR_KW, "first_hitting", {}),
    ],
    ids=["bd3-first-hitting", "bd3-ddpm", "bd3-ddpm3", "bd3-confidence", "ar"],
)
def test_block_size_one_is_ancestral_sampling(model_kw, sampler, extra):
    model = tiny_model(seed=4, vocab_size=5, model_length=8, **model_kw)
    prompt = [2]
    n = 6000
    res = generate(
        model, [torch.tensor(prompt)], max_new_tokens=2, num_samples=n, sampler=sampler, seed=11, **extra
    )
    pairs = torch.stack([s[1:] for s in res.sequences])
    counts = torch.zeros(5, 5, dtype=torch.float64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n, dtype=torch.float64), accumulate=True)
    probs = _exact_two_token_joint(model, prompt)
    assert _chi_square_pvalue(counts.flatten(), probs.flatten()) > 1e-3
    # one network call per token, as AR: the first token is committed by the call that predicts the second.
    # (DDPM with T > L' steps may call again at a step where some sequence of the batch changed.)
    if extra.get("steps", 1) == 1:
        assert res.nfe == 2


def test_top_k_restricts_the_ancestral_support():
    model = tiny_model(seed=4, vocab_size=5, model_length=8, block_size=1)
    res = generate(model, [torch.tensor([2])], max_new_tokens=1, num_samples=2000, top_k=2, seed=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 4]])).logits[0, -1]
    logits[4] = -math.inf
    allowed = set(torch.topk(logits, 2).indices.tolist())
    assert {int(s[1]) for s in res.sequences} == allowed


# -- NFE accounting
# ---------------------------------------------------------------------------------------------


def test_first_hitting_uses_one_call_per_token_at_every_block_size():
    # a finished block is committed by the next block's first call: NFE = generated tokens, with or without the
    # cache, inside the window, past it (exact re-encodes and streaming alike), at block size 1 as for AR
    for bs in (1, 2, 4):
        for kw in ({}, {"kv_cache": False}, {"streaming": True}, {"window_stride": bs}):
            model = sharp_model(block_size=bs, model_length=16)
            res = generate(model, [torch.arange(4)], max_new_tokens=48, seed=0, **kw)
            assert res.nfe == 48, (bs, kw, res.nfe)
    # an AR model and a BD3-LM of block size 1 make the same number of calls
    ar = generate(sharp_model(**AR_KW), [torch.arange(4)], max_new_tokens=48, seed=0)
    assert ar.nfe == 48


def test_confidence_nfe_vs_threshold():
    model = sharp_model(block_size=8, model_length=64, gain=12.0)
    kw = dict(max_new_tokens=48, seed=0, temperature=0.0)
    fh = generate(model, [torch.arange(8)], **kw)
    one = generate(model, [torch.arange(8)], sampler="confidence", threshold=1.0, **kw)
    low = generate(model, [torch.arange(8)], sampler="confidence", threshold=0.3, **kw)
    assert one.nfe == fh.nfe == 48
    assert low.nfe < one.nfe
    assert low.tokens_per_forward > one.tokens_per_forward


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 50])
def test_ddpm_never_produces_nan_or_mask(steps):
    model = tiny_model(block_size=4)
    calls, hook = recorder()
    res = generate(
        model,
        prompts(3, 9),
        max_new_tokens=30,
        sampler="ddpm",
        steps=steps,
        top_p=0.3,
        top_k=3,
        seed=1,
        on_logits=hook,
    )
    for s in res.sequences:
        assert len(s) in (33, 39) and int(s.max()) < model.config.vocab_size and int(s.min()) >= 0
        assert not bool((s == model.config.mask_index).any())
    assert all(torch.isfinite(c[1]).all() for c in calls)
    # one sequence: a call only at steps that changed something, so at most min(T, #to-generate) per block
    single = generate(model, prompts(3), max_new_tokens=30, sampler="ddpm", steps=steps, seed=1)
    todo = [1] + [4] * 7 + [1]  # the prompt fills 3 positions of block 0; 1 + 28 + 1 = 30 tokens
    assert single.nfe <= sum(min(steps, t) for t in todo)
    if steps == 1:
        assert single.nfe == len(todo)  # one call per block; commits ride on the next block's first call
    rule = DDPMRule(steps)
    probs = [rule.reveal_prob(i) for i in range(steps)]
    assert all(0 < p <= 1 and math.isfinite(p) for p in probs) and probs[-1] == 1.0


def test_ddpm_with_a_schedule_object():
    from bd3lm.schedules import get_schedule

    rule = DDPMRule(5, schedule=get_schedule("loglinear"))
    assert [round(rule.reveal_prob(i), 12) for i in range(5)] == [round(1 / (5 - i), 12) for i in range(5)]
    model = tiny_model(block_size=4)
    res = generate(
        model, prompts(5), max_new_tokens=12, sampler=DDPMRule(3, schedule=get_schedule("cosine")), seed=0
    )
    assert len(res.sequences[0]) == 17 and not bool((res.sequences[0] == model.config.mask_index).any())


# -- windows: streaming error and memory
# ----------------------------------------------------------------------


class ForcedRule(BlockRule):
    """Reveals every position at once with tokens read from a script (teacher forcing through the sampler)."""

    name = "forced"

    def __init__(self, script):
        self.script, self.block = script, -1

    def start_block(self, todo):
        self.block += 1

    def step(self, logits, todo, sampler):
        return self.script[self.block].expand(todo.shape[0], -1).clone(), todo.clone()


def _streaming_oracle(model, own, window, stride, bs):
    """Logits (bs, V) of the last block of ``own`` (a sequence's own tokens, ending with its noisy block) from ONE
    uncached forward over the whole sequence with a banded block-causal mask: a query of block b attends key k iff
    block(k) <= b and k >= w_b, w_b = stride * ceil(max(0, end_b - window) / stride) the window start of the call
    that generated block b. Every layer of every column is thus computed with that column's own window: exactly
    what streaming's kept (stale) keys/values hold, with nothing ever re-encoded. Absolute positions 0..N-1."""
    n = len(own)
    q = torch.arange(n)
    end = (q // bs + 1) * bs
    w = stride * torch.div((end - window).clamp(min=0) + stride - 1, stride, rounding_mode="floor")
    allowed = ((q[None, :] // bs) <= (q[:, None] // bs)) & (q[None, :] >= w[:, None])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([own]), attention_mask=allowed[None]).logits[0, -bs:]
    return out, int(w[-1])


@pytest.mark.parametrize("window_stride", [None, 8], ids=["stride-default", "stride-8"])
def test_streaming_logits_equal_a_banded_uncached_forward(window_stride):
    """streaming=True past the window against an independent oracle (:func:`_streaming_oracle`), call by call, for
    a batch of two prompts (4 and 12 tokens: different left pads) and 10 teacher-forced blocks, up to 52 tokens,
    far past the 16-token window (the streaming cache also drops its oldest columns on the way).

    Before the first slide the logits must also equal the exact (unbounded, uncached) sampler's; after it, they
    must differ from a fresh forward over the retained window alone (the stale keys/values are a real
    approximation for a 2-layer model, so the oracle discriminates), while for a 1-layer model (whose keys/values
    depend on the token and its position only) streaming equals that fresh forward over exactly the retained
    window."""
    bs, window, n_blocks = 4, 16, 10
    stride = bs if window_stride is None else window_stride
    script = torch.randint(0, 32, (n_blocks, bs), generator=torch.Generator().manual_seed(0))
    batch = [torch.tensor([5, 9, 1, 30]), torch.tensor([7, 3, 3, 12, 0, 31, 2, 8, 8, 1, 6, 4])]
    m = 32
    worst = {}
    for n_layers in (2, 1):
        model = tiny_model(block_size=bs, model_length=64, n_blocks=n_layers)
        logs = {}
        for streaming in (True, False):
            calls, hook = recorder()
            kw = dict(streaming=True) if streaming else dict(kv_cache=False)
            generate(model, batch, max_new_tokens=bs * n_blocks, sampler=ForcedRule(script), window=window,
                     window_stride=window_stride, on_logits=hook, **kw)
            logs[streaming] = calls
        assert len(logs[True]) == len(logs[False]) == n_blocks
        d_or = d_exact_before = 0.0
        d_fresh_after = []
        for k, ((ids, got), (_, exact)) in enumerate(zip(logs[True], logs[False], strict=True)):
            assert ids == [0, 1]
            for r, p in enumerate(batch):
                own = p.tolist() + script[:k].flatten().tolist() + [m] * bs
                want, ws = _streaming_oracle(model, own, window, stride, bs)
                d_or = max(d_or, (got[r] - want).abs().max().item())
                if ws == 0:  # the window has not slid: streaming is exact
                    d_exact_before = max(d_exact_before, (got[r] - exact[r]).abs().max().item())
                else:  # a fresh uncached forward over exactly the retained window, positions from 0
                    with torch.no_grad():
                        fresh = model(input_ids=torch.tensor([own[ws:]])).logits[0, -bs:]
                    d_fresh_after.append((got[r] - fresh).abs().max().item())
        worst[n_layers] = (d_or, d_exact_before, min(d_fresh_after), max(d_fresh_after))
    print("streaming: max |logit - oracle|, max |logit - exact| before the slide, min / max |logit - fresh window|",
          worst)
    assert len(d_fresh_after) >= 2 * (n_blocks - 4)  # most calls are past the slide (both rows)
    for n_layers, (d_or, d_before, _, _) in worst.items():
        assert d_or <= 1e-5, (n_layers, d_or)
        assert d_before <= 1e-5, (n_layers, d_before)
    assert worst[1][3] <= 1e-5  # one layer: streaming = a fresh forward over the retained window
    assert worst[2][2] > 1e-3  # two layers: it is not, at every call past the slide (stale keys/values)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_model
    from bd3lm.sampling import generate
    torch.set_num_threads(1)
    model = tiny_model(block_size=8, model_length=128, hidden_dim=64, n_heads=4)
    proc = psutil.Process()
    generate(model, None, max_new_tokens=128, sampler="ddpm", steps=1, seed=0)  # warm-up
    out = {}
    for factor in (2, 10):
        base = proc.memory_info().rss
        peak = [base]
        def on_block(i, tokens):
            peak[0] = max(peak[0], proc.memory_info().rss)
        res = generate(model, None, max_new_tokens=128 * factor, sampler="ddpm", steps=1, seed=0,
        on_block=on_block)
        out[factor] = {"growth": peak[0] - base, "n": len(res.sequences[0])}
    print(json.dumps(out))
    """
)


def test_ten_times_the_training_length_with_flat_memory():
    """Peak RSS growth (sampled at every block, in a fresh process) of 10x model_length vs 2x model_length."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, tests_dir],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["2"]["n"] == 256 and info["10"]["n"] == 1280
    growth2, growth10 = info["2"]["growth"], info["10"]["growth"]
    assert growth10 <= 1.5 * growth2 + 8 * 2**20, (growth2, growth10)


# -- stopping
# ----------------------------------------------------------------------------------------------------


def test_eos_stops_only_the_sequence_that_produced_it():
    model = sharp_model(seed=1, block_size=4, vocab_size=64)
    kw = dict(max_new_tokens=40, sampler="confidence", temperature=0.0, threshold=0.5)
    batch = prompts(5, 7, 2, seed=3, vocab=63)
    free = generate(model, batch, **kw)
    gens = [s[len(p) :].tolist() for s, p in zip(free.sequences, batch, strict=True)]
    # a token produced by sequence 0 and by no other sequence is an EOS for sequence 0 only
    eos = next(t for t in gens[0] if all(t not in g for g in gens[1:]))
    calls, hook = recorder()
    res = generate(model, batch, stop=eos, on_logits=hook, **kw)
    cut = gens[0].index(eos) + 1
    # a finished row leaves the batch at once: every later call runs on the unfinished rows only
    finished_at = next(k for k, (ids, _) in enumerate(calls) if 0 not in ids)
    assert all(ids == [1, 2] and logits.shape[0] == 2 for ids, logits in calls[finished_at:])
    assert all(ids == [0, 1, 2] for ids, _ in calls[:finished_at])
    assert res.sequences[0].tolist() == batch[0].tolist() + gens[0][:cut]
    assert res.stop_reasons == ["eos", "max_new_tokens", "max_new_tokens"]
    for i in (1, 2):
        assert res.sequences[i].tolist() == free.sequences[i].tolist()
    assert res.nfe_per_sequence[0] < res.nfe_per_sequence[1]


def test_max_new_tokens_and_entropy_stop():
    model = tiny_model(block_size=4, vocab_size=33)
    res = generate(model, prompts(4, 6), max_new_tokens=13, seed=0)
    assert [len(s) for s in res.sequences] == [17, 19] and res.stop_reasons == ["max_new_tokens"] * 2
    assert res.num_new_tokens == [13, 13]
    # 32 real tokens: the unigram entropy of 256 tokens is at most log(32) = 3.47 < 4 nats
    res = generate(model, prompts(4), max_new_tokens=400, seed=0, stop_entropy=4.0, sampler="ddpm", steps=1)
    assert res.stop_reasons == ["entropy"] and len(res.sequences[0]) == 4 + 256
    res = generate(model, prompts(4), max_new_tokens=300, seed=0, stop_entropy=0.0, sampler="ddpm", steps=1)
    assert res.stop_reasons == ["max_new_tokens"]


def test_on_block_streams_the_generated_tokens():
    model = tiny_model(block_size=4)
    got = {0: [], 1: []}
    res = generate(
        model, prompts(3, 8), max_new_tokens=21, seed=0, on_block=lambda i, t: got[i].extend(t.tolist())
    )
    for i, p in enumerate(prompts(3, 8)):
        assert got[i] == res.sequences[i][len(p) :].tolist()


def test_seeded_sampling_is_reproducible_and_never_emits_the_mask():
    model = tiny_model(block_size=4)
    a = generate(model, None, max_new_tokens=40, num_samples=3, seed=7, top_p=0.9)
    b = generate(model, None, max_new_tokens=40, num_samples=3, seed=7, top_p=0.9)
    c = generate(model, None, max_new_tokens=40, num_samples=3, seed=8, top_p=0.9)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    assert [s.tolist() for s in a.sequences] != [s.tolist() for s in c.sequences]
    for s in a.sequences:
        assert len(s) == 40 and not bool((s == model.config.mask_index).any())
    bos = generate(model, None, max_new_tokens=8, bos_token_id=3, num_samples=2, seed=0)
    assert all(s[0] == 3 and len(s) == 9 for s in bos.sequences)


def test_model_mode_is_restored():
    model = tiny_model(block_size=4).train()
    generate(model, None, max_new_tokens=4, seed=0)
    assert model.training
    out = model(input_ids=torch.zeros(1, 32, dtype=torch.long))  # a training forward still works
    assert out.logits.shape == (1, 16, 33)


# -- logits processing
# -------------------------------------------------------------------------------------------


def test_nucleus_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept(0.4) == [0]
    assert kept(0.75) == [0, 1]  # 0.3 crosses 0.75 and is kept (the official BD3 rule would keep [0] only)
    assert kept(0.85) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [0]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_filters_match_hugging_face(p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    ours = torch.isfinite(top_p_filter(logits.clone(), p))
    theirs = torch.isfinite(TopPLogitsWarper(top_p=p)(None, logits.clone()))
    assert torch.equal(ours, theirs)
    for k in (1, 5, 49):
        assert torch.equal(
            torch.isfinite(top_k_filter(logits, k)),
            torch.isfinite(TopKLogitsWarper(top_k=k)(None, logits.clone())),
        )


def _kept(logits, p, rule):
    return torch.isfinite(top_p_filter(logits, p, rule)).nonzero().squeeze(-1).tolist()


def test_official_nucleus_drops_the_token_that_crosses_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log()
    assert _kept(logits, 0.85, "official") == [0, 1]  # cumsum 0.5, 0.8 <= 0.85; 0.95 crosses: dropped
    assert _kept(logits, 0.85, "hf") == [0, 1, 2]  # the crossing token is kept
    assert _kept(logits, 0.75, "official") == [0]  # 0.8 crosses 0.75
    assert _kept(logits, 0.75, "hf") == [0, 1]
    assert _kept(logits, 0.97, "official") == [0, 1, 2]
    for rule in ("hf", "official"):
        assert _kept(logits, 0.4, rule) == [0]  # the top-1 alone exceeds p: always kept
        assert _kept(logits, 1e-9, rule) == [0]
        assert _kept(logits, 1.0, rule) == [0, 1, 2, 3]  # p = 1 is off
    # Unsorted token ids and a batch: the rule works on the ranking, row by row.
    batch = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.05, 0.15, 0.3, 0.5]], dtype=torch.float64).log()
    kept = torch.isfinite(top_p_filter(batch, 0.85, "official"))
    assert kept.tolist() == [[False, True, False, True], [False, False, True, True]]
    # The sampler applies the chosen rule: mass only on the official nucleus.
    lp = TokenSampler(9, top_p=0.85, top_p_rule="official").log_probs(torch.cat([logits, torch.full((6,), -math.inf)]))
    assert torch.isfinite(lp).nonzero().squeeze(-1).tolist() == [0, 1]
    assert torch.allclose(lp[:2].exp(), torch.tensor([0.625, 0.375], dtype=torch.float64))


def _official_oracle(probs: list[float], p: float) -> tuple[set[int], bool]:
    """The official rule in plain Python: (kept ids, whether some cumulative sum is too close to p to tell)."""
    order = []
    left = list(range(len(probs)))
    while left:  # selection sort, descending probability, ties by id
        best = left[0]
        for i in left[1:]:
            if probs[i] > probs[best]:
                best = i
        order.append(best)
        left.remove(best)
    kept, cum, ambiguous = set(), 0.0, False
    for rank, i in enumerate(order):
        cum += probs[i]
        ambiguous = ambiguous or abs(cum - p) < 1e-9
        if rank == 0 or cum <= p:
            kept.add(i)
    return kept, ambiguous


def test_official_nucleus_matches_a_plain_python_oracle():
    import random

    rng = random.Random(0)
    checked = 0
    for n in range(2, 9):
        rows = []
        for _ in range(30):
            w = [rng.random() ** 3 + 1e-6 for _ in range(n)]
            rows.append([x / sum(w) for x in w])
        logits = torch.tensor(rows, dtype=torch.float64).log()
        for p in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.99):
            kept = torch.isfinite(top_p_filter(logits, p, rule="official"))
            for r, probs in enumerate(rows):
                want, ambiguous = _official_oracle(probs, p)
                if ambiguous:  # softmax(log q) differs from q by rounding: too close to the boundary to tell
                    continue
                assert set(kept[r].nonzero().squeeze(-1).tolist()) == want, (probs, p)
                checked += 1
    assert checked > 0.95 * 7 * 30 * 9


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_official_nucleus_is_the_hf_nucleus_minus_at_most_the_crossing_token(p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g) * 3
    official = torch.isfinite(top_p_filter(logits, p, "official"))
    hf = torch.isfinite(top_p_filter(logits, p, "hf"))
    assert not bool((official & ~hf).any())  # subset
    extra = (hf & ~official).sum(-1)
    assert bool((extra <= 1).all()) and bool((official.sum(-1) >= 1).all())
    probs = torch.softmax(logits.double(), -1)
    for r in range(64):
        if extra[r]:  # the dropped token is the least probable of the hf nucleus (the one crossing p)
            assert probs[r][hf[r]].min() == probs[r][hf[r] & ~official[r]].max()
        mass = float(probs[r][official[r]].sum())
        assert mass <= p + 1e-12 or int(official[r].sum()) == 1  # retained mass <= p unless top-1 alone > p
    if p >= 0.3:  # (at p = 0.05 the top-1 alone exceeds p on every row: both rules keep it only)
        assert bool((extra == 1).any())  # the rules do differ on these rows


def test_official_nucleus_stays_inside_the_hf_nucleus_under_rounding():
    # The last token's probability (~1e-35) is lost in the float64 cumulative sum: the naive official test
    # "cumsum <= p" at p = that sum would keep it although the hf rule (mass above it >= p) drops it.
    logits = torch.tensor([0.0, -1.0, -2.0, -80.0], dtype=torch.float64)
    cum = torch.cumsum(torch.softmax(logits, -1), -1)
    for p in (float(cum[2]), float(cum[1]), 0.5):
        if p >= 1.0:
            continue
        official = torch.isfinite(top_p_filter(logits, p, "official"))
        hf = torch.isfinite(top_p_filter(logits, p, "hf"))
        assert not bool((official & ~hf).any()) and int((hf & ~official).sum()) <= 1


def test_bad_top_p_rule_is_a_one_line_value_error():
    model = tiny_model(block_size=4)
    message = "top_p_rule must be 'hf' or 'official'; got 'x'"
    with pytest.raises(ValueError) as info:
        generate(model, max_new_tokens=4, top_p=0.9, top_p_rule="x")
    assert str(info.value) == message
    for bad in ("HF", "", None, 1):
        with pytest.raises(ValueError, match=f"^top_p_rule must be 'hf' or 'official'; got {bad!r}$"):
            generate(model, max_new_tokens=4, top_p_rule=bad)
    with pytest.raises(ValueError, match="^top_p_rule must be"):
        TokenSampler(9, top_p=0.9, top_p_rule="x")
    with pytest.raises(ValueError, match="^top_p_rule must be"):
        top_p_filter(torch.zeros(4), 0.9, rule="x")


def test_generate_with_the_official_rule_is_seeded_and_reproducible():
    model = tiny_model(block_size=4)
    kw = dict(max_new_tokens=24, num_samples=3, top_p=0.9, top_p_rule="official")
    a = generate(model, None, seed=7, **kw)
    b = generate(model, None, seed=7, **kw)
    c = generate(model, None, seed=8, **kw)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    assert [s.tolist() for s in a.sequences] != [s.tolist() for s in c.sequences]
    for s in a.sequences:
        assert len(s) == 24 and not bool((s == model.config.mask_index).any())


def test_generate_samples_from_the_official_nucleus():
    """AR model: each token comes from one next-token call, so it can be checked against that call's logits."""
    model = tiny_model(**AR_KW)

    p = 0.3  # a small nucleus: the crossing token carries a large share of the hf nucleus's mass

    def run(rule):
        seen = []
        res = generate(
            model,
            None,
            max_new_tokens=16,
            num_samples=8,
            bos_token_id=0,
            seed=3,
            top_p=p,
            top_p_rule=rule,
            on_logits=lambda ids, lg: seen.append((list(ids), lg[:, -1].clone())),
        )
        outside = 0
        for t, (ids, lg) in enumerate(seen):
            official = torch.isfinite(top_p_filter(lg, p, "official"))
            for r, sid in enumerate(ids):
                outside += not bool(official[r, int(res.sequences[sid][1 + t])])
        return outside, len(seen)

    assert run("official") == (0, 16)
    outside_hf, _ = run("hf")
    assert outside_hf > 0, outside_hf  # the hf rule does sample crossing tokens here: the check has teeth


def test_temperature_zero_is_argmax_and_mask_is_never_sampled():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    logits[:, 9] = 100.0  # the mask (id 9) would win without SUBS
    greedy = TokenSampler(9, temperature=0.0, top_p=0.5, top_k=3)
    ref = logits.clone()
    ref[:, 9] = -math.inf
    assert torch.equal(greedy.sample(logits), ref.argmax(-1))
    draws = TokenSampler(9, temperature=1.0, generator=torch.Generator().manual_seed(1)).sample(
        logits[:1].expand(20000, -1)
    )
    assert not bool((draws == 9).any())
    freq = torch.bincount(draws, minlength=10).double() / 20000
    assert (freq[:9] - torch.softmax(ref[0].double(), -1)[:9]).abs().max() < 0.02
    hot = TokenSampler(9, temperature=1e-3, generator=torch.Generator().manual_seed(1)).sample(logits)
    assert torch.equal(hot, ref.argmax(-1))


# -- bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_ids=[]), "input_ids is an empty list"),
        (dict(input_ids=[torch.arange(17)]), "prompt 0 has 17 tokens, longer than the window 16"),
        (dict(input_ids=[torch.arange(12)], window=8), "prompt 0 has 12 tokens, longer than the window 8"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1; got 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1; got -3"),
        (dict(sampler="confidence", threshold=0.0), r"threshold must be in \(0, 1\]; got 0.0"),
        (dict(sampler="confidence", threshold=1.5), r"threshold must be in \(0, 1\]; got 1.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]; got 0.0"),
        (dict(top_p=1.2), r"top_p must be in \(0, 1\]; got 1.2"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(window=10), "window 10 is not a multiple of the block size 4"),
        (dict(window=32), "window 32 exceeds the model's training length model_length=16"),
        (dict(window_stride=6), "window_stride 6 must be a multiple of the block size 4"),
        (dict(sampler="beam"), "unknown sampler 'beam'"),
        (dict(sampler="first_hitting", steps=3), "steps=3 applies only to sampler ddpm, analytic or euler"),
        (dict(sampler="ddpm", steps=0), "steps must be a positive integer; got 0"),
        (dict(streaming=True, kv_cache=False), "streaming=True keeps stale cache entries"),
        (dict(input_ids=[torch.tensor([1, 32])]), "prompt 0 contains the mask token id 32"),
        (dict(input_ids=[torch.tensor([1, 40])]), "outside the vocabulary"),
        (dict(stop=32), "token id 32 .* other than the mask 32"),
        (dict(num_samples=0), "num_samples must be an integer >= 1; got 0"),
    ],
)
def test_bad_input_is_a_one_line_value_error(kwargs, message):
    model = tiny_model(block_size=4)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        generate(model, **kwargs)
    assert "\n" not in str(info.value)


def test_autoregressive_model_needs_a_prompt():
    model = tiny_model(**AR_KW)
    with pytest.raises(ValueError, match="needs a non-empty prompt"):
        generate(model, None, max_new_tokens=4)
    res = generate(model, None, max_new_tokens=4, bos_token_id=0, num_samples=2, seed=0)
    assert [len(s) for s in res.sequences] == [5, 5] and res.nfe == 4


def test_confidence_rule_reveals_at_least_one_per_row():
    rule = ConfidenceRule(0.99)
    logits = torch.zeros(2, 4, 6)
    todo = torch.tensor([[True, True, False, True], [False, False, False, False]])
    tokens, reveal = rule.step(logits, todo, TokenSampler(5, temperature=0.0))
    assert reveal.sum(1).tolist() == [1, 0] and bool((reveal <= todo).all())


@pytest.mark.parametrize(
    "model_kw", [dict(block_size=4), AR_KW, dict(block_size=1)], ids=["bd3", "ar", "bd3-L1"]
)
def test_streaming_mode_runs_batched_far_past_the_window(model_kw):
    model = tiny_model(**model_kw)
    batch = prompts(3, 9, 1)
    res = generate(model, batch, max_new_tokens=70, streaming=True, window_stride=4, seed=0)
    assert [len(s) for s in res.sequences] == [73, 79, 71]
    assert not any(bool((s == model.config.mask_index).any()) for s in res.sequences)
    # inside the first window streaming and exact agree
    short = dict(max_new_tokens=4, sampler="confidence", temperature=0.0, seed=0)
    a = generate(model, batch, streaming=True, **short)
    b = generate(model, batch, **short)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]


def test_inverse_cdf_sampling_is_exact_and_never_draws_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)  # the last token has p = 0
    n = 200_000
    log_probs = probs.log().expand(n, -1)
    draws = sample_categorical(log_probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[probs == 0].sum() == 0
    assert _chi_square_pvalue(counts[probs > 0], probs[probs > 0]) > 1e-3
    # a one-token distribution and unnormalised log-probabilities (total mass 3) are handled alike
    one = sample_categorical(torch.tensor([[-math.inf, 0.0, -math.inf]]).expand(100, -1), None)
    assert one.eq(1).all()
    shifted = sample_categorical((probs.log() + math.log(3.0)).expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(shifted, minlength=6).double()[probs == 0], torch.zeros(3, dtype=torch.float64))


class _FullLogitsFirstHitting(FirstHittingRule):
    """First hitting that asks for the whole block's logits (the path of rules that cannot say in advance)."""

    def reads(self, todo, sampler):
        return None


@pytest.mark.parametrize("kv_cache", [True, False])
def test_first_hitting_reading_one_position_equals_reading_the_block(kv_cache):
    # the network skips the positions the rule never reads; tokens (same seed, same draws) and NFE are unchanged
    model = sharp_model(block_size=4)
    kw = dict(max_new_tokens=40, seed=5, kv_cache=kv_cache)
    batch = prompts(3, 8, 1, seed=2)
    one = generate(model, batch, **kw)
    full = generate(model, batch, sampler=_FullLogitsFirstHitting(), **kw)
    assert [s.tolist() for s in one.sequences] == [s.tolist() for s in full.sequences]
    assert one.nfe == full.nfe


def test_outputs_kept_on_the_device_equal_outputs_copied_per_block():
    # without stop rules or callbacks the finished blocks are copied to the host once, at the end
    model = sharp_model(block_size=4)
    kw = dict(max_new_tokens=30, seed=1, sampler="confidence", threshold=0.5)
    batch = prompts(2, 9, 5, seed=4)
    deferred = generate(model, batch, **kw)
    seen = []
    per_block = generate(model, batch, on_block=lambda i, t: seen.append(i), **kw)
    assert seen  # the callback forces the per-block path
    assert [s.tolist() for s in deferred.sequences] == [s.tolist() for s in per_block.sequences]
    assert deferred.num_new_tokens == per_block.num_new_tokens == [30, 30, 30]
