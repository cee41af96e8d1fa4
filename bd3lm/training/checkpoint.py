"""Checkpoint plumbing of training runs: atomic Lightning checkpoints, warm starts, the Hugging Face export, RNG state.

Every Lightning checkpoint is written to a temporary file beside the target and renamed into place, so a crash or
SIGKILL never leaves a truncated ``last.ckpt`` and a failed write (a full disk) is one line that keeps the previous
checkpoint. Non-finite weights are refused, and a CRC-32 of every tensor is stored and checked on loading: torch's
zip reader does not check, so flipped bytes would otherwise be resumed silently.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from bd3lm.atomic import atomic_directory, default_mode
from bd3lm.checkpoint import check_checkpoint_dir
from bd3lm.ema import EMA
from bd3lm.faults import CheckpointWriteError, NonFiniteError, dumps
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
    "verify_checkpoint",
]


#: Buffers that hold the training clip interval, not learned weights: a warm start resets them.
INTERVAL_KEYS = ("sampling_eps_min", "sampling_eps_max")

#: Checkpoint entry holding ``{"crc32": ..., "tensors": ...}`` of every tensor of the checkpoint.
INTEGRITY_KEY = "bd3lm_integrity"

#: Where a Lightning checkpoint holds the model and the optimiser (which must be finite); elsewhere infinities
#: are legitimate (``ModelCheckpoint`` starts its best score at ±inf).
WEIGHT_PATHS = ("state_dict.", "optimizer_states.", "bd3lm.ema.")


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(key path, tensor)`` of every tensor in nested dicts/lists, in order (the integrity entry skipped)."""
    if isinstance(tree, torch.Tensor):
        yield prefix.rstrip("."), tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            if not (prefix == "" and k == INTEGRITY_KEY):
                yield from _tensors(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}{i}.")


def scan_tensors(tree: Any, finite: tuple[str, ...] | None = None) -> tuple[int, int, str | None]:
    """``(crc32, number of tensors, key path of the first non-finite tensor or None)`` over ``tree``; only tensors
    under the key path prefixes ``finite`` (None: every tensor) must be finite."""
    crc, count, bad = 0, 0, None
    for path, t in _tensors(tree):
        data = t.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"{path}|{data.dtype}|{tuple(t.shape)}".encode(), crc)
        if data.numel():
            crc = zlib.crc32(data.view(torch.uint8).numpy(), crc)
        checked = finite is None or path.startswith(finite)
        if bad is None and checked and data.is_floating_point() and not bool(torch.isfinite(data).all()):
            bad = path
        count += 1
    return crc, count, bad


def _first_os_error(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``exc`` (torch reports a failed write as a RuntimeError raised while handling it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_VERIFIED: dict[tuple, bool] = {}


def verify_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse (one-line ``ValueError`` naming ``path``) a checkpoint whose tensors are non-finite or whose
    tensors no longer match the CRC-32 stored when it was written (checkpoints without one are accepted)."""
    key = None
    with suppress(OSError):
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key is not None and _VERIFIED.get(key):
        return
    crc, count, bad = scan_tensors(ckpt, WEIGHT_PATHS)
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} holds non-finite values ({bad}); it cannot be used: delete it (or restore an "
            f"older copy) to start over"
        )
    stored = ckpt.get(INTEGRITY_KEY)
    if isinstance(stored, Mapping) and (stored.get("crc32") != crc or stored.get("tensors") != count):
        raise ValueError(
            f"checkpoint {path} is corrupt (its tensors do not match the checksum written with them); delete it "
            f"(or restore an older copy) to start over"
        )
    if key is not None:
        _VERIFIED[key] = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with the atomic, finite, checksummed saves of the module docstring (a failed write
    is one :class:`~bd3lm.faults.CheckpointWriteError` line) and verified loads (:func:`verify_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not support storage_options")
        path = Path(path)
        crc, count, bad = scan_tensors(checkpoint, WEIGHT_PATHS)
        if bad is not None:
            raise NonFiniteError(f"refusing to write checkpoint {path}: {bad} holds non-finite values")
        checkpoint = {**checkpoint, INTEGRITY_KEY: {"crc32": crc, "tensors": count}}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
            with suppress(OSError):  # make the rename durable (some filesystems cannot fsync a directory)
                fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            err = _first_os_error(e) if isinstance(e, Exception) else None
            if err is not None:
                raise CheckpointWriteError(
                    f"could not write checkpoint to {path.parent}: {err.strerror or err}"
                ) from None
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        ckpt = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        verify_checkpoint(ckpt, path)
        return ckpt


def clean_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a run killed mid-write left: ``checkpoints/.*.tmp``, ``.*.tmp``, ``.hf.*``, ``.tokenizer.*``.

    Only call this from the process that owns ``run_dir`` (rank 0, before training). Returns what was removed.
    """
    root = Path(run_dir)
    stale = [p for pattern in ("checkpoints/.*.tmp", ".*.tmp", ".hf.*", ".tokenizer.*") for p in root.glob(pattern)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Load a Lightning checkpoint safely (``weights_only=True``: no arbitrary unpickling; tensors memory-mapped)
    and verify it (:func:`verify_checkpoint`); any failure is a one-line error naming the file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        first = _first_line(e)
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({first}); delete it to start over") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "bd3lm" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a bd3lm training checkpoint (no state_dict/bd3lm entries)")
    verify_checkpoint(ckpt, path)
    return ckpt


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights stored at ``path``: an exported directory (safetensors) or a Lightning ``.ckpt`` (EMA weights).

    For a ``.ckpt`` the EMA shadow is preferred (that is what validation used and what would be exported);
    buffers come from its ``state_dict``. Pickled ``.bin``/``.pt`` files are refused.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        check_checkpoint_dir(p)
        from safetensors.torch import load_file

        index = p / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
        state: dict[str, torch.Tensor] = {}
        for f in files or ["model.safetensors"]:
            try:
                state.update(load_file(str(p / f)))
            except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
                first = _first_line(e)
                raise ValueError(f"init_from {path}: {p / f} is not a readable safetensors file ({first})") from None
        return state
    if p.is_file() and p.suffix == ".ckpt":
        ckpt = inspect_checkpoint(p)
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        if (ema := ckpt["bd3lm"].get("ema")) is not None:
            state.update(ema["shadow"])
        return state
    if not p.exists():
        raise FileNotFoundError(f"init_from {path} does not exist")
    raise ValueError(f"init_from {path} must be an exported model directory (safetensors) or a Lightning .ckpt")


def load_init_weights(model: BD3LM, path: str | os.PathLike) -> dict:
    """Warm-start ``model`` in place from ``path``; returns ``path`` and, when known, ``source_block_size``.

    Strict: every weight of ``model`` must be present with the same shape and no extra weight may exist, except
    the clip interval buffers (left at ``model``'s configured interval, since the block size usually changes).
    Errors are one line, naming the first offending keys.
    """
    state, own = read_state_dict(path), model.state_dict()
    missing = sorted(k for k in own if k not in state and k not in INTERVAL_KEYS)
    unexpected = sorted(k for k in state if k not in own and k not in INTERVAL_KEYS)
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in INTERVAL_KEYS and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = [f"shape mismatch (checkpoint vs model): {'; '.join(shapes[:3])}"] if shapes else []
    parts += [f"missing keys: {missing[:3]}"] if missing else []
    parts += [f"unexpected keys: {unexpected[:3]}"] if unexpected else []
    if parts:
        raise ValueError(f"init_from {path} does not match the model configuration: {', '.join(parts)}")
    weights = {k: v.to(own[k].dtype) for k, v in state.items() if k not in INTERVAL_KEYS}
    model.load_state_dict({**own, **weights}, strict=True)
    info: dict = {"path": str(path)}
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        info["source_block_size"] = int(json.loads((p / "config.json").read_text()).get("block_size", 0)) or None
    elif p.suffix == ".ckpt":
        info["source_block_size"] = (inspect_checkpoint(p).get("bd3lm_config") or {}).get("block_size")
    return info


def export_hf(
    model: BD3LM, out_dir: str | os.PathLike, *, ema: EMA | None = None, tokenizer=None, info: dict | None = None
) -> Path:
    """Write ``model`` (EMA weights when ``ema`` is given) + ``tokenizer`` atomically to ``out_dir`` (official layout).

    The current clip interval is in the ``sampling_eps_min/max`` buffers and mirrored in ``config.json``.
    ``info`` (training step, tokens, validation NELBO, ...) is written to ``training_info.json`` (strict JSON:
    NaN becomes ``null``). An existing ``out_dir`` is replaced only once the new export is complete; non-finite
    weights are refused (:class:`~bd3lm.faults.NonFiniteError`) and leave it untouched.
    """
    out = Path(out_dir)
    bad = scan_tensors({**model.state_dict(), **(ema.shadow if ema is not None else {})})[2]
    if bad is not None:
        raise NonFiniteError(f"refusing to export non-finite weights ({bad}) to {out}")
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
            (tmp / "training_info.json").write_text(dumps(info, indent=2, default=str) + "\n")
    return out


def rng_state() -> dict:
    """This process's global RNG states in a ``torch.load(weights_only=True)``-safe form."""
    np_state = np.random.get_state()
    numpy = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
