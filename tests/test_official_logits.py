"""Our model reproduces the official BD3-LM model's logits (random weights, stored fixtures).

The fixtures in ``tests/fixtures/official/`` were produced by the official ``modeling_bd3lm.py`` of
kuleshov-group/bd3lms (commit in ``meta.json``) with ``make_fixtures.py`` (its docstring says how to regenerate
them); the official code is never imported here. The official checkpoint (random, non-zero weights in the official
layout) is loaded through ``BD3LM.from_pretrained`` with each case's ``block_size`` / ``time_conditioning``, the
same inputs are run through the corresponding mode of our model, and the logits must agree to ``ATOL``.

Modes compared (block sizes 1, 4 and 16 = L):

- ``two_stream`` / ``two_stream_timed``: the vectorised training pass on ``[x_t ; x_0]``; timed = one σ per
  sequence (B,), which both implementations apply to every token of both streams. (Our per-token σ — each
  block's σ on x_t, 0 on x_0, see bd3lm/model.py — deliberately replaces the official conditioning, where the
  first block's σ stands for the whole sequence; it has no official counterpart and is not compared.)
- ``sample`` / ``sample_prefix`` / ``sample_timed``: the plain pass (official ``sample_mode=True`` without cache,
  block-causal mask) on x_t, and on the length-12 input ``[x_0[:8] ; x_t[8:12]]``.
- ``kv_cache``: the official cached protocol, block by block (a call on the noisy block, whose logits are
  compared, then a call on the clean block that commits it); and our sampler's protocol, where one call feeds the
  previous clean block ahead of the noisy block (block-causal ``attention_mask``) and commits the clean part.
  The official cache buffer is bf16 on CUDA; the fixtures use the same buffer in float32 (see make_fixtures.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import bd3lm
from bd3lm.checkpoint import official_state_dict_keys

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CHECKPOINT = FIXTURES / "checkpoint"
ATOL = 1e-5
BLOCK_SIZES = (1, 4, 16)
BACKENDS = ("sdpa", "reference")


@lru_cache(maxsize=1)
def meta() -> dict:
    return json.loads((FIXTURES / "meta.json").read_text())


@lru_cache(maxsize=1)
def fixtures() -> dict[str, Tensor]:
    return load_file(FIXTURES / "logits.safetensors")


@lru_cache(maxsize=16)
def our_model(block_size: int, timed: bool, backend: str = "sdpa") -> bd3lm.BD3LM:
    """The official checkpoint loaded through our official-layout loader (strict: every key must match)."""
    model = bd3lm.BD3LM.from_pretrained(
        CHECKPOINT, block_size=block_size, time_conditioning=timed, attn_backend=backend
    )
    return model.eval()


def inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    f = fixtures()
    return f["input/x0"], f["input/xt"], f["input/prefix"], f["input/sigma"]


def assert_matches_official(ours: Tensor, key: str) -> float:
    """Assert ``max |ours - official| <= ATOL`` for the fixture ``key``; return the figure."""
    ref = fixtures()[key]
    assert ours.shape == ref.shape, f"{key}: shape {tuple(ours.shape)} != official {tuple(ref.shape)}"
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{key}: max |Δlogits| = {diff:.3g} > {ATOL:g}"
    return diff


def test_fixture_metadata() -> None:
    """The fixtures describe what the tests assume: the tiny config, the official commit, every case."""
    m = meta()
    assert len(m["official_commit"]) == 40
    assert m["config"]["model_length"] == 16 and m["config"]["vocab_size"] == 50
    assert m["block_sizes"] == list(BLOCK_SIZES)
    cases = {"two_stream", "two_stream_timed", "sample", "sample_prefix", "sample_timed", "kv_cache"}
    assert set(m["cases"]) == {f"{c}/bs{bs}" for c in cases for bs in BLOCK_SIZES}
    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    assert cfg["model_type"] == "bd3lm" and cfg["cond_dim"] == m["config"]["cond_dim"]


def test_checkpoint_has_official_keys() -> None:
    """The official model's state dict has exactly the keys our loader expects, with non-zero adaLN and head."""
    sd = load_file(CHECKPOINT / "model.safetensors")
    assert set(sd) == set(official_state_dict_keys(n_blocks=meta()["config"]["n_blocks"]))
    for key in ("backbone.blocks.0.adaLN_modulation.weight", "backbone.output_layer.linear.weight",
                "backbone.output_layer.adaLN_modulation.bias"):
        assert sd[key].abs().min() > 0, f"{key} is not randomised"


def test_fixtures_are_informative() -> None:
    """The official logits depend on σ and on the mask (so the timed and sampling cases test something)."""
    f = fixtures()
    for bs in BLOCK_SIZES:
        assert (f[f"two_stream_timed/bs{bs}"] - f[f"two_stream/bs{bs}"]).abs().max() > 0.1
        assert f[f"two_stream/bs{bs}"].std() > 0.5
    assert (f["sample/bs4"] - f["two_stream/bs4"]).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("timed", [False, True], ids=["untimed", "timed"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_two_stream(block_size: int, timed: bool, backend: str) -> None:
    x0, xt, _, sigma = inputs()
    model = our_model(block_size, timed, backend)
    with torch.no_grad():
        out = model(input_ids=torch.cat([xt, x0], dim=1), timesteps=sigma if timed else None).logits
    assert_matches_official(out, f"two_stream{'_timed' if timed else ''}/bs{block_size}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sample", "sample_prefix", "sample_timed"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_sampling_pass(block_size: int, case: str, backend: str) -> None:
    _, xt, prefix, sigma = inputs()
    timed = case == "sample_timed"
    model = our_model(block_size, timed, backend)
    ids = prefix if case == "sample_prefix" else xt
    with torch.no_grad():
        out = model(input_ids=ids, timesteps=sigma if timed else None).logits
    assert_matches_official(out, f"{case}/bs{block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kv_cache_official_protocol(block_size: int) -> None:
    """Noisy block → logits, then the clean block in its own call, committed (the official order of calls)."""
    x0, xt, _, _ = inputs()
    model = our_model(block_size, False)
    batch, length = xt.shape
    cache = model.new_cache(batch)
    logits = []
    with torch.no_grad():
        for start in range(0, length, block_size):
            pos = torch.arange(start, start + block_size).expand(batch, -1)
            logits.append(model(input_ids=xt[:, start:start + block_size], kv_cache=cache, positions=pos).logits)
            model(input_ids=x0[:, start:start + block_size], kv_cache=cache, positions=pos)
            cache.commit()
    assert_matches_official(torch.cat(logits, dim=1), f"kv_cache/bs{block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kv_cache_sampler_protocol(block_size: int) -> None:
    """One call per block: the previous (clean) block ahead of the noisy block, block-causally; the clean part is
    committed afterwards (how our sampler spends no call on committing alone)."""
    x0, xt, _, _ = inputs()
    model = our_model(block_size, False)
    batch, length = xt.shape
    cache = model.new_cache(batch)
    logits = []
    with torch.no_grad():
        for start in range(0, length, block_size):
            lo = max(start - block_size, 0)
            ids = torch.cat([x0[:, lo:start], xt[:, start:start + block_size]], dim=1)
            n_clean, n_new = start - lo, ids.shape[1]
            pos = torch.arange(lo, start + block_size).expand(batch, -1)
            mask = torch.ones(batch, n_new, cache.length + n_new, dtype=torch.bool)
            mask[:, :n_clean, cache.length + n_clean:] = False  # the clean block does not see the noisy one
            out = model(input_ids=ids, kv_cache=cache, positions=pos, attention_mask=mask).logits
            logits.append(out[:, n_clean:])
            cache.commit(n_clean)
    assert_matches_official(torch.cat(logits, dim=1), f"kv_cache/bs{block_size}")
