"""Checkpoint plumbing of training runs: atomic Lightning checkpoints, warm starts, the Hugging Face export.

* :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a temporary file in the target directory
  and renames it into place, so a crash or SIGKILL never leaves a truncated ``last.ckpt``.
* :func:`inspect_checkpoint` opens a checkpoint with ``weights_only=True`` (no arbitrary unpickling) and turns
  any failure into a one-line error.
* :func:`load_init_weights` warm-starts a model from an exported directory (safetensors only) or a Lightning
  checkpoint (its EMA weights), with a strict key and shape check.
* :func:`export_hf` writes ``config.json`` + ``model.safetensors`` (EMA weights, learned clip interval in the
  buffers and the config) + the tokenizer, atomically, in the official layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from bd3lm.atomic import atomic_directory, default_mode
from bd3lm.checkpoint import check_checkpoint_dir
from bd3lm.ema import EMA
from bd3lm.model import BD3LM

__all__ = [
    "AtomicCheckpointIO",
    "clean_stale_temporaries",
    "export_hf",
    "inspect_checkpoint",
    "load_init_weights",
    "read_state_dict",
    "rng_state",
    "set_rng_state",
]


#: Buffers that hold the training clip interval, not learned weights: a warm start resets them.
INTERVAL_KEYS = ("sampling_eps_min", "sampling_eps_max")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic: temporary file in the same directory + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not support storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def clean_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a run killed mid-write left: ``checkpoints/.*.tmp``, ``.hf.*``, ``.tokenizer.*``.

    Only call this from the process that owns ``run_dir`` (rank 0, before training). Returns what was removed.
    """
    root = Path(run_dir)
    stale = (
        list((root / "checkpoints").glob(".*.tmp"))
        + list(root.glob(".hf.*"))
        + list(root.glob(".tokenizer.*"))
    )
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Load a Lightning checkpoint safely (``weights_only=True``, tensors memory-mapped); one-line errors."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"checkpoint {path} is corrupt or unreadable ({first}); delete it to start over"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "bd3lm" not in ckpt:
        raise ValueError(
            f"checkpoint {path} is not a bd3lm training checkpoint (no state_dict/bd3lm entries)"
        )
    return ckpt


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights stored at ``path``: an exported directory (safetensors) or a Lightning ``.ckpt`` (EMA weights).

    For a ``.ckpt`` the EMA shadow is preferred (that is what validation used and what would be exported);
    buffers come from its ``state_dict``. Pickled ``.bin``/``.pt`` files are refused.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        check_checkpoint_dir(p)
        from safetensors.torch import load_file

        index = p / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(str(p / f)))
            return state
        return load_file(str(p / "model.safetensors"))
    if p.is_file() and p.suffix == ".ckpt":
        ckpt = inspect_checkpoint(p)
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        ema = ckpt["bd3lm"].get("ema")
        if ema is not None:
            state.update(ema["shadow"])
        return state
    if not p.exists():
        raise FileNotFoundError(f"init_from {path} does not exist")
    raise ValueError(
        f"init_from {path} must be an exported model directory (safetensors) or a Lightning .ckpt"
    )


def load_init_weights(model: BD3LM, path: str | os.PathLike) -> dict:
    """Warm-start ``model`` in place from ``path`` with a strict check; returns info about the source.

    Every weight of ``model`` must be present with the same shape and no extra weight may exist, except the
    clip interval buffers (reset to ``model``'s configured interval, since the block size usually changes).
    Errors are one line, naming the first offending keys. The returned dict has ``path`` and, when known, the
    source's ``block_size``.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    skip = set(INTERVAL_KEYS)
    missing = sorted(k for k in own if k not in state and k not in skip)
    unexpected = sorted(k for k in state if k not in own and k not in skip)
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in skip and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model): {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"missing keys: {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:3]}")
        raise ValueError(f"init_from {path} does not match the model configuration: {', '.join(parts)}")
    weights = {k: v for k, v in state.items() if k not in skip}
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in weights.items()}}, strict=True)
    info: dict = {"path": str(path)}
    p = Path(os.path.expanduser(str(path)))
    cfg_file = p / "config.json" if p.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        info["source_block_size"] = int(json.loads(cfg_file.read_text()).get("block_size", 0)) or None
    elif p.suffix == ".ckpt":
        cfg = inspect_checkpoint(p).get("bd3lm_config") or {}
        info["source_block_size"] = cfg.get("block_size")
    return info


def export_hf(
    model: BD3LM,
    out_dir: str | os.PathLike,
    *,
    ema: EMA | None = None,
    tokenizer=None,
    info: dict | None = None,
) -> Path:
    """Write ``model`` (EMA weights when ``ema`` is given) + ``tokenizer`` to ``out_dir`` atomically.

    The current clip interval is in the ``sampling_eps_min/max`` buffers and mirrored in ``config.json``.
    ``info`` (training step, tokens, validation NELBO, ...) is written to ``training_info.json``. An existing
    ``out_dir`` is replaced only once the new export is complete.
    """
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        if hasattr(model, "sampling_eps_min"):  # mirror the buffers in config.json (keeping exact decimals)
            for name in INTERVAL_KEYS:
                value = float(getattr(model, name))
                if abs(float(getattr(model.config, name)) - value) > 1e-6:
                    setattr(model.config, name, value)
        with ema.swapped(model) if ema is not None else nullcontext():
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if info is not None:
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def rng_state() -> dict:
    """This process's global RNG states in a ``torch.load(weights_only=True)``-safe form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
