import pytest
import torch
from bd3lm.kernels import StructuredMask, attention, backend_available, resolve_backend


def qkv(n_q, n_kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, n_q, 8, generator=g), torch.randn(2, 3, n_kv, 8, generator=g),
            torch.randn(2, 3, n_kv, 8, generator=g))


MASKS = [
    StructuredMask("two_stream", 16, 4, 32),
    StructuredMask("two_stream", 16, 4, 16),  # last layer: x_t queries only
    StructuredMask("two_stream", 16, 1, 32),
    StructuredMask("block_causal", 16, 4, 16),
    StructuredMask("block_causal", 16, 1, 16),
    StructuredMask("full", 16, 16, 16),
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m.kind}-{m.block_size}-{m.n_q}")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_agree_with_reference(mask, backend):
    q, k, v = qkv(mask.n_q, mask.n_kv)
    ref = attention(q, k, v, mask, "reference")
    with torch.no_grad():
        out = attention(q, k, v, mask, backend)
    assert (out - ref).abs().max().item() <= 1e-5


def test_dense_tensor_mask_matches_structured():
    m = StructuredMask("two_stream", 8, 2, 16)
    q, k, v = qkv(16, 16)
    assert torch.allclose(attention(q, k, v, m, "sdpa"), attention(q, k, v, m.dense(q.device), "sdpa"), atol=1e-6)


def test_backend_resolution_and_errors():
    assert resolve_backend(None, "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu", grad=True) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'cuDNN'"):
        resolve_backend("cuDNN", "cpu")
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_backend("flex", "cpu", grad=True)
    assert resolve_backend("flex", "cpu", grad=False) == "flex"
    ok, why = backend_available("flash_attn", "cpu")
    assert not ok and "flash" in why
    with pytest.raises(ValueError, match="flash_attn"):
        resolve_backend("flash_attn", "cpu")


def test_flex_refuses_backward_on_cpu():
    q, k, v = qkv(16, 32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, StructuredMask("two_stream", 16, 4, 16), "flex")
