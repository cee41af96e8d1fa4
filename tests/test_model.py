import pytest
import torch
from conftest import tiny_config, tiny_model

import bd3lm


def two_stream(model, xt, x0):
    with torch.no_grad():
        return model(input_ids=torch.cat([xt, x0], 1)).logits


def sample_pair(cfg, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, cfg.vocab_size - 1, (batch, cfg.model_length), generator=g)
    masked = torch.rand(x0.shape, generator=g) < 0.5
    return torch.where(masked, cfg.mask_index, x0), x0


@pytest.mark.parametrize("bs", [1, 2, 4, 8])
def test_two_stream_equals_block_causal_sampling_pass(bs):
    model = tiny_model(block_size=bs)
    xt, x0 = sample_pair(model.config)
    logits = two_stream(model, xt, x0)
    assert logits.shape == (2, 16, 33)
    for b in range(16 // bs):
        seq = torch.cat([x0[:, : b * bs], xt[:, b * bs : (b + 1) * bs]], 1)
        with torch.no_grad():
            ref = model(input_ids=seq).logits[:, -bs:]
        assert (logits[:, b * bs : (b + 1) * bs] - ref).abs().max().item() <= 1e-5


def test_block_size_l_is_bidirectional_mdlm():
    model = tiny_model(block_size=16)
    xt, x0 = sample_pair(model.config)
    with torch.no_grad():
        plain = model(input_ids=xt).logits
    assert (two_stream(model, xt, x0) - plain).abs().max().item() <= 1e-6


def test_perturbations_respect_the_mask():
    model = tiny_model(block_size=4)
    xt, x0 = sample_pair(model.config)
    base = two_stream(model, xt, x0)
    for j in range(4):
        sl = slice(4 * j, 4 * j + 4)
        x0p = x0.clone()
        x0p[:, sl] = (x0p[:, sl] + 1) % 32
        changed = (two_stream(model, xt, x0p) - base).abs().amax(dim=(0, 2))
        assert changed[: 4 * (j + 1)].max().item() == 0.0  # clean block j is read only by blocks > j
        if j < 3:
            assert changed[4 * (j + 1) :].min().item() > 0
        xtp = xt.clone()
        xtp[:, sl] = (xtp[:, sl] + 1) % 32
        changed = (two_stream(model, xtp, x0) - base).abs().amax(dim=(0, 2))
        outside = torch.ones(16, dtype=torch.bool)
        outside[sl] = False
        assert changed[outside].max().item() == 0.0 and changed[sl].min().item() > 0


def test_backends_agree_on_the_model():
    cfg_kw = dict(block_size=4)
    xt, x0 = sample_pair(tiny_config(**cfg_kw))
    outs = {}
    for backend in ["reference", "sdpa", "flex"]:
        model = tiny_model(attn_backend=backend, **cfg_kw)
        with torch.no_grad():
            outs[backend] = (two_stream(model, xt, x0), model(input_ids=x0).logits)
    for backend in ["sdpa", "flex"]:
        for a, b in zip(outs[backend], outs["reference"], strict=True):
            assert (a - b).abs().max().item() <= 1e-5


def test_adaln_without_time_conditioning_is_constant():
    model = tiny_model()
    xt, x0 = sample_pair(model.config)
    with torch.no_grad():
        a = model(input_ids=torch.cat([xt, x0], 1)).logits
        b = model(input_ids=torch.cat([xt, x0], 1), timesteps=torch.rand(2)).logits
    assert torch.equal(a, b)
    tc = tiny_model(time_conditioning=True)
    with torch.no_grad():
        c = tc(input_ids=torch.cat([xt, x0], 1), timesteps=torch.zeros(2)).logits
        d = tc(input_ids=torch.cat([xt, x0], 1), timesteps=torch.full((2,), 3.0)).logits
    assert not torch.allclose(c, d)


def test_autoregressive_model_is_causal():
    model = tiny_model(causal=True, cross_attn=False, adaln=False, block_size=1)
    assert "backbone.sigma_map.mlp.0.weight" not in model.state_dict()
    x = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        full = model(input_ids=x).logits
        prefix = model(input_ids=x[:, :7]).logits
    assert (full[:, :7] - prefix).abs().max().item() <= 1e-5


def test_bad_inputs_are_one_line_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence length 6 is not a multiple of block_size 4"):
        model(input_ids=torch.zeros(1, 12, dtype=torch.long), two_stream=True)
    with pytest.raises(ValueError, match="input length 20 is neither <= model_length 16"):
        model(input_ids=torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 40 is outside the vocabulary"):
        model(input_ids=torch.full((1, 8), 40))
    with pytest.raises(ValueError, match="block_size 5 does not divide model_length 16"):
        tiny_config(block_size=5)
    with pytest.raises(ValueError, match="unknown attn_backend 'xformers'"):
        tiny_config(attn_backend="xformers")
    flex = tiny_model(attn_backend="flex").train()
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex(input_ids=torch.zeros(1, 32, dtype=torch.long))


def test_public_api_names():
    cfg = bd3lm.BD3LMConfig(vocab_size=10, model_length=8, block_size=2, hidden_dim=16, cond_dim=8, n_blocks=1,
                            n_heads=2)
    assert cfg.mask_index == 9
    assert bd3lm.BD3LMConfig(vocab_size=10, model_length=8, mask_token_id=3).mask_index == 3


def test_bf16_weights_run_without_autocast():
    model = tiny_model().to(torch.bfloat16)
    xt, x0 = sample_pair(model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([xt, x0], 1)).logits
    ref = two_stream(tiny_model(), xt, x0)
    assert logits.dtype == torch.bfloat16 and (logits.float() - ref).abs().max().item() < 0.25


def test_shorter_two_stream_input_needs_the_explicit_flag():
    model = tiny_model(block_size=4)
    xt, x0 = sample_pair(model.config)
    with torch.no_grad():
        short = model(input_ids=torch.cat([xt[:, :8], x0[:, :8]], 1), two_stream=True).logits
        full = two_stream(model, xt, x0)
    assert short.shape == (2, 8, 33) and (short - full[:, :8]).abs().max().item() <= 1e-5


def _blockwise_cached_logits(model, x0, xt, train: bool = False, timesteps=None):
    """Logits of every noisy block x_t^b given the clean prefix x_0^{<b}, one cached call per block: the clean
    block b - 1 and the noisy block b go through one call (block-causal mask) and only the clean one is kept."""
    bs, (b, n) = model.config.block_size, x0.shape
    cache = model.new_cache(b, capacity=n + bs)
    model.train(train)
    out = []
    with torch.no_grad():
        for k in range(n // bs):
            lo = max(0, (k - 1) * bs)
            inp = torch.cat([x0[:, lo : k * bs], xt[:, k * bs : (k + 1) * bs]], 1)
            cols = torch.arange(lo, (k + 1) * bs)
            keys = torch.arange(0, (k + 1) * bs)
            mask = (keys[None, :] // bs <= cols[:, None] // bs).expand(b, -1, -1)
            logits = model(input_ids=inp, kv_cache=cache, positions=cols.expand(b, -1), attention_mask=mask,
                           timesteps=timesteps, logits_to_keep=bs).logits
            cache.commit(k * bs - lo)
            out.append(logits)
    model.eval()
    return torch.cat(out, 1)


@pytest.mark.parametrize("kw", [dict(block_size=4), dict(block_size=2, time_conditioning=True)],
                         ids=["adaln", "time-conditioned"])
def test_cached_calls_equal_the_two_stream_pass(kw):
    """The sampler's cached calls (conditioning folded into the affine maps in eval mode; unfolded in train mode
    or with a time input) give the training pass's logits: the two-stream pass is the oracle."""
    model = tiny_model(**kw)
    xt, x0 = sample_pair(model.config)
    ref = two_stream(model, xt, x0)
    assert (_blockwise_cached_logits(model, x0, xt) - ref).abs().max().item() <= 1e-5
    assert (_blockwise_cached_logits(model, x0, xt, train=True) - ref).abs().max().item() <= 1e-5
    if model.config.time_conditioning:
        sigma = torch.zeros(2)
        assert (_blockwise_cached_logits(model, x0, xt, timesteps=sigma) - ref).abs().max().item() <= 1e-5


def test_cache_is_allocated_in_the_compute_dtype_and_logits_to_keep_slices():
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 8))
    cache = model.new_cache(2, capacity=16)
    assert cache.dtype is None and cache.nbytes() == 0  # allocated by the first write
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, kv_cache=cache, positions=torch.arange(8).expand(2, -1), attention_mask=None)
    assert cache.dtype == torch.bfloat16
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last = model(input_ids=ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, 33) and torch.equal(last, full[:, -3:])
    with pytest.raises(ValueError, match="logits_to_keep must be an integer >= 0"):
        model(input_ids=ids, logits_to_keep=-1)


@pytest.mark.parametrize("name", ["sample_mode", "store_kv", "timestep", "logits_to_kep"])
def test_unknown_forward_keywords_are_a_one_line_type_error(name):
    model = tiny_model()
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TypeError) as err:
        model(input_ids=x, **{name: True})
    msg = str(err.value)
    assert "\n" not in msg and repr(name) in msg
    accepted = msg.split("accepted: ")[1].split(", ")
    for real in ("input_ids", "timesteps", "kv_cache", "positions", "attention_mask", "logits_to_keep"):
        assert real in accepted
    assert name not in accepted


def test_return_dict_is_accepted_and_changes_nothing():
    model = tiny_model()
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        for flag in (True, False):
            out = model(input_ids=x, return_dict=flag)
            assert torch.equal(out.logits, ref) and torch.equal(out[0], ref)


def test_float_ids_are_a_one_line_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids must hold integer token ids .* got dtype torch.float32"):
        model(input_ids=torch.zeros(1, 8))
    with pytest.raises(TypeError, match="input_ids must be a \\(batch, length\\) tensor of token ids; got list"):
        model(input_ids=[[1, 2, 3, 4]])
