"""Shared fixtures: offline hub, tiny models with random (non-zero) weights."""

import hashlib
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


# ------------------------------------------------------------------------------------------ Hub cache

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_snapshot(cache, repo_id: str, model_dir, commit: str = HUB_COMMIT,
                   files=("config.json", "model.safetensors")):
    """Copy ``files`` of ``model_dir`` into ``cache`` in the Hub cache layout; return the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name in files:
        data = (model_dir / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", digest))
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under a temporary HF_HOME, offline (huggingface_hub reads its constants at import, so
    the module attributes are patched as well as the environment)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
