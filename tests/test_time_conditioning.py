"""Per-token noise conditioning: one σ per input token (one per block in block diffusion, 0 on clean tokens).

Oracles: per-token σ that are all equal reproduce per-sequence σ; block causality of the two-stream pass (the σ of
x_t's block b reaches block b only); the cached calls equal the plain block-causal pass; row restrictions equal the
rows of the full output; the loss equals a hand-built two-stream forward with per-token σ.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize

import bd3lm
from bd3lm.noise import sample_mask
from bd3lm.objectives import diffusion_loss
from bd3lm.schedules import get_schedule

L, V = 8, 13


def tc_model(block_size: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> bd3lm.BD3LM:
    """A tiny time-conditioned model with random (non-zero) adaLN weights, so σ changes the logits.

    ``float64`` for the comparisons at 1e-6: in float32, GEMMs over a different number of rows (B per-sequence
    rows vs B·N per-token rows) round differently, a few ulps of logits of size ~4 (~3e-6)."""
    torch.manual_seed(seed)
    cfg = bd3lm.BD3LMConfig(vocab_size=V, model_length=L, block_size=block_size, hidden_dim=32, n_heads=2,
                            n_blocks=2, cond_dim=16, time_conditioning=True, dropout=0.0)
    return randomize(bd3lm.BD3LM(cfg), seed).to(dtype).eval()


def data(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (batch, L), generator=g)
    xt = torch.where(torch.rand(x0.shape, generator=g) < 0.5, V - 1, x0)
    return xt, x0


def block_sigma(batch: int, block_size: int, seed: int = 2) -> torch.Tensor:
    """Random per-token σ (B, L), constant within each block."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.rand(batch, L // block_size, generator=g)).repeat_interleave(block_size, 1)


def two_stream_sigma(sig: torch.Tensor) -> torch.Tensor:
    """σ on x_t, 0 on the clean x_0 half."""
    return torch.cat([sig, torch.zeros_like(sig)], 1)


def cached(model, chunks, sigmas, positions, bs, **kw) -> list[torch.Tensor]:
    """Feed ``chunks`` one after another through a KV cache (each committed), block-causally."""
    b = chunks[0].shape[0]
    cache = model.new_cache(b, capacity=L)
    outs = []
    for ids, sig, pos in zip(chunks, sigmas, positions, strict=True):
        keys = torch.arange(int(pos[-1]) + 1)
        mask = (keys[None, :] // bs <= pos[:, None] // bs).expand(b, -1, -1)
        outs.append(model(input_ids=ids, timesteps=sig, kv_cache=cache, positions=pos.expand(b, -1),
                          attention_mask=mask, **kw).logits)
        cache.commit()
    return outs


@torch.no_grad()
@pytest.mark.parametrize("bs", [2, 4])
def test_equal_per_token_sigma_equals_per_sequence_sigma(bs):
    model = tc_model(bs, dtype=torch.float64)
    xt, x0 = data()
    s = torch.tensor([0.3, 2.0])
    for ids in (xt, torch.cat([xt, x0], 1)):  # plain and two-stream
        per_seq = model(input_ids=ids, timesteps=s).logits
        per_tok = model(input_ids=ids, timesteps=s[:, None].expand(-1, ids.shape[1])).logits
        assert (per_tok - per_seq).abs().max().item() <= 1e-6
    pos = [torch.arange(0, bs), torch.arange(bs, 2 * bs)]
    chunks = [x0[:, :bs], xt[:, bs : 2 * bs]]
    per_seq = cached(model, chunks, [s, s], pos, bs)
    per_tok = cached(model, chunks, [s[:, None].expand(-1, bs)] * 2, pos, bs)
    for a, b in zip(per_tok, per_seq, strict=True):
        assert (a - b).abs().max().item() <= 1e-6
    assert not torch.allclose(model(input_ids=xt, timesteps=s).logits, model(input_ids=xt).logits)


@torch.no_grad()
@pytest.mark.parametrize("bs", [2, 4])
def test_block_sigma_reaches_its_block_only(bs):
    """Two-stream pass: x_t's block b is read by x_t's block b only, so its σ changes exactly that block; the
    clean block b is read by x_t's blocks > b, so its σ changes those only."""
    model = tc_model(bs)
    xt, x0 = data()
    sig = two_stream_sigma(block_sigma(2, bs))
    base = model(input_ids=torch.cat([xt, x0], 1), timesteps=sig).logits
    blk = torch.arange(L) // bs
    for b in range(L // bs):
        for half in (0, 1):
            s2 = sig.clone()
            s2[:, half * L : (half + 1) * L][:, blk == b] += 1.5
            change = (model(input_ids=torch.cat([xt, x0], 1), timesteps=s2).logits - base).abs().amax(dim=(0, 2))
            hit = (blk == b) if half == 0 else (blk > b)
            assert change[~hit].max().item() <= 1e-6  # blocks < b (and > b for x_t's σ) are untouched
            if hit.any():
                assert change[hit].min().item() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("bs", [2, 4])
def test_two_stream_equals_plain_pass_with_clean_prefix_at_sigma_zero(bs):
    """The two-stream logits of block b with per-block σ (0 on the clean half) equal the plain block-causal pass on
    ``cat([x_0^{<b}, x_t^b])`` with σ = 0 on the prefix and σ_b on the block."""
    model = tc_model(bs)
    xt, x0 = data()
    sig = block_sigma(2, bs)
    two = model(input_ids=torch.cat([xt, x0], 1), timesteps=two_stream_sigma(sig)).logits
    for b in range(L // bs):
        lo, hi = b * bs, (b + 1) * bs
        ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
        s = torch.cat([torch.zeros(2, lo), sig[:, lo:hi]], 1)
        plain = model(input_ids=ids, timesteps=s).logits[:, lo:]
        assert (plain - two[:, lo:hi]).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("train", [False, True])
def test_cached_prefix_then_block_equals_plain_pass(train):
    bs = 2
    model = tc_model(bs)
    xt, x0 = data()
    sig = block_sigma(2, bs)
    p = 4  # clean prefix (two blocks), then the noisy block 2
    ids = torch.cat([x0[:, :p], xt[:, p : p + bs]], 1)
    s = torch.cat([torch.zeros(2, p), sig[:, p : p + bs]], 1)
    plain = model(input_ids=ids, timesteps=s).logits
    model.train(train)
    pre, blk = cached(model, [ids[:, :p], ids[:, p:]], [s[:, :p], s[:, p:]],
                      [torch.arange(p), torch.arange(p, p + bs)], bs)
    assert (pre - plain[:, :p]).abs().max().item() <= 1e-5
    assert (blk - plain[:, p:]).abs().max().item() <= 1e-5
    # the sampler's form: prefix and block in one call, only the block's logits
    (one,) = cached(model, [ids], [s], [torch.arange(p + bs)], bs, logits_to_keep=bs)
    assert (one - plain[:, p:]).abs().max().item() <= 1e-5
    model.eval()


@torch.no_grad()
def test_row_restrictions_follow_per_token_sigma():
    bs = 2
    model = tc_model(bs, dtype=torch.float64)
    xt, x0 = data()
    sig = block_sigma(2, bs)
    g = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(L, generator=g)[:3] for _ in range(2)])
    rows = torch.rand(2, L, generator=g) < 0.5
    for ids, s in ((xt, sig), (torch.cat([xt, x0], 1), two_stream_sigma(sig))):
        full = model(input_ids=ids, timesteps=s).logits
        masked = model(input_ids=ids, timesteps=s, logits_mask=rows).logits
        assert (masked - full[rows]).abs().max().item() <= 1e-6
        picked = model(input_ids=ids, timesteps=s, logits_index=index).logits
        assert (picked - full.gather(1, index[:, :, None].expand(-1, -1, V))).abs().max().item() <= 1e-6
        last = model(input_ids=ids, timesteps=s, logits_to_keep=3).logits
        assert (last - full[:, -3:]).abs().max().item() <= 1e-6
    # cached mode: the last layer computes the kept queries only
    s = torch.cat([torch.zeros(2, 6), sig[:, 6:]], 1)
    ids = torch.cat([x0[:, :6], xt[:, 6:]], 1)
    pos = [torch.arange(L)]
    (full,) = cached(model, [ids], [s], pos, bs)
    for kw, ref in (
        (dict(logits_index=index), full.gather(1, index[:, :, None].expand(-1, -1, V))),
        (dict(logits_to_keep=3), full[:, -3:]),
        (dict(logits_mask=rows), full[rows]),
        (dict(logits_index=index, logits_mask=rows[:, :3]), full.gather(1, index[:, :, None].expand(-1, -1, V))[
            rows[:, :3]]),
    ):
        (out,) = cached(model, [ids], [s], pos, bs, **kw)
        assert (out - ref).abs().max().item() <= 1e-6


def test_wrong_timesteps_shape_is_a_one_line_error():
    model = tc_model(2)
    xt, x0 = data()
    for bad in (torch.zeros(3), torch.zeros(2, L + 1), torch.zeros(2, 1, L), torch.zeros(())):
        with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\) .* or \(2, 8\)") as err:
            model(input_ids=xt, timesteps=bad)
        assert "\n" not in str(err.value) and str(tuple(bad.shape)) in str(err.value)
    with pytest.raises(ValueError, match=r"or \(2, 16\) .*; got \(2, 8\)"):
        model(input_ids=torch.cat([xt, x0], 1), timesteps=torch.zeros(2, L))
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"or \(2, 2\) .*; got \(2, 3\)"):
        model(input_ids=xt[:, :2], timesteps=torch.zeros(2, 3), kv_cache=cache, positions=torch.arange(2)[None])


def oracle_loss(model, x0, xt, masked, t, per_token_sigma) -> torch.Tensor:
    """Σ_b w(t_b) Σ_{masked ℓ ∈ b} -log p(x_0^ℓ) / (B L) from one two-stream forward (log-linear: w = 1/t)."""
    logits = model(input_ids=torch.cat([xt, x0], 1), timesteps=per_token_sigma).logits.float()
    logits[..., V - 1] = float("-inf")
    nll = -F.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    w = (1 / t).repeat_interleave(L // t.shape[1], 1)
    return (w * nll * masked).sum() / x0.numel()


@pytest.mark.parametrize("bs", [2, 4])
def test_diffusion_loss_uses_one_sigma_per_block(bs):
    model = tc_model(bs)
    _, x0 = data()
    t = torch.tensor([[0.2, 0.9, 0.5, 0.7], [0.6, 0.3, 0.95, 0.4]])[:, : L // bs]
    out = diffusion_loss(model, x0, t=t, generator=torch.Generator().manual_seed(5))
    masked = sample_mask(2, L, bs, t, get_schedule("loglinear"), clip=None,
                         generator=torch.Generator().manual_seed(5))
    xt = torch.where(masked, V - 1, x0)
    sigma = (-torch.log1p(-t)).repeat_interleave(bs, 1)
    with torch.no_grad():
        ref = oracle_loss(model, x0, xt, masked, t, two_stream_sigma(sigma))
        wrong_clean = oracle_loss(model, x0, xt, masked, t, torch.cat([sigma, sigma], 1))
        one_level = oracle_loss(model, x0, xt, masked, t, sigma[:, :1].expand(-1, 2 * L))
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())
    assert abs(out.loss.item() - wrong_clean.item()) > 1e-4
    assert abs(out.loss.item() - one_level.item()) > 1e-4
    out.loss.backward()  # trains: the gradient reaches the σ embedding
    assert model.backbone.sigma_map.mlp[0].weight.grad.abs().sum().item() > 0


def test_diffusion_loss_single_block_keeps_per_sequence_sigma():
    model = tc_model(L)
    _, x0 = data()
    t = torch.tensor([[0.3], [0.8]])
    out = diffusion_loss(model, x0, t=t, generator=torch.Generator().manual_seed(5))
    masked = sample_mask(2, L, L, t, get_schedule("loglinear"), clip=None, generator=torch.Generator().manual_seed(5))
    xt = torch.where(masked, V - 1, x0)
    with torch.no_grad():
        logits = model(input_ids=xt, timesteps=-torch.log1p(-t[:, 0])).logits.float()
    logits[..., V - 1] = float("-inf")
    nll = -F.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    ref = ((1 / t) * nll * masked).sum() / x0.numel()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())
