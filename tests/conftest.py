"""Shared fixtures: offline hub, tiny models with random (non-zero) weights."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="bd3lm-hf-datasets-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import bd3lm  # noqa: E402

torch.set_num_threads(2)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (the official init zeroes adaLN and the head, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_config(**kw) -> bd3lm.BD3LMConfig:
    base = dict(
        vocab_size=33, model_length=16, block_size=4, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4,
        dropout=0.0,
    )
    base.update(kw)
    return bd3lm.BD3LMConfig(**base)


def tiny_model(seed: int = 0, **kw) -> bd3lm.BD3LM:
    torch.manual_seed(seed)
    return randomize(bd3lm.BD3LM(tiny_config(**kw)), seed).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids oversubscribing the shared cores (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    return tiny_model()
