"""What eval.speed and its perf suite share: the benchmark models (random weights or a checkpoint), the device and
the prompt token."""

from __future__ import annotations

from typing import Any

from eval.common import CLIError

__all__ = ["build_model", "prompt_token", "resolve_device"]


def resolve_device(name: str):
    """``torch.device`` for ``name`` (``auto`` = CUDA when available); raises :class:`CLIError`."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"device {name!r} is not valid: {' '.join(str(exc).split())}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"device {name!r} requested but MPS is not available")
    return device


def build_model(s: dict[str, Any], block_size: int | None, causal: bool, device):
    """The benchmark model: the checkpoint, or a random-weight BD3-LM (``block_size``) / AR model of the stated
    size (every weight drawn from N(0, 0.02) except norms: the official init zeroes the head and adaLN)."""
    import torch

    import bd3lm

    if s["checkpoint"] is not None:
        from bd3lm.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(s["checkpoint"])  # checked by eval.speed already; for callers of this function
        model = bd3lm.BD3LM.from_pretrained(s["checkpoint"])
    else:
        torch.manual_seed(0)
        kw = dict(
            vocab_size=s["vocab"],
            model_length=s["length"],
            hidden_dim=s["dim"],
            cond_dim=128,
            n_blocks=s["layers"],
            n_heads=s["heads"],
            dropout=0.0,
        )
        if causal:
            config = bd3lm.BD3LMConfig(block_size=1, causal=True, cross_attn=False, adaln=False, **kw)
        else:
            config = bd3lm.BD3LMConfig(block_size=block_size, **kw)
        model = bd3lm.BD3LM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, 0.02)
    return model.to(device).eval()


def prompt_token(model) -> int | None:
    """The model's ``bos_token_id`` when it is a usable token id (not the mask), else ``None`` (id 0)."""
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    ok = isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < cfg.vocab_size and bos != cfg.mask_index
    return bos if ok else None
