"""Checkpoint plumbing of training runs: atomic Lightning checkpoints, warm starts, the Hugging Face export.

* :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a temporary file in the target directory
  and renames it into place, so a crash or SIGKILL never leaves a truncated ``last.ckpt``; a failed write (a
  full disk) is one line and leaves the previous checkpoint intact. It refuses to write non-finite values and
  stores a CRC-32 of every tensor, which loading checks (:func:`verify_checkpoint`): torch's zip reader does
  not, so flipped bytes would otherwise be resumed silently.
* :func:`inspect_checkpoint` opens a checkpoint with ``weights_only=True`` (no arbitrary unpickling), verifies
  it and turns any failure into a one-line error naming the file.
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
import zlib
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
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


#: Where a Lightning checkpoint holds the model and the optimiser (which must be finite); elsewhere infinities
#: are legitimate (``ModelCheckpoint`` starts its best score at ±inf).
WEIGHT_PATHS = ("state_dict.", "optimizer_states.", "bd3lm.ema.")


def scan_tensors(tree: Any, finite: tuple[str, ...] | None = None) -> tuple[int, int, str | None]:
    """``(crc32, number of tensors, key path of the first non-finite tensor or None)`` over ``tree``.

    ``finite``: the key path prefixes whose tensors must be finite (None: every tensor).
    """
    crc, count, bad = 0, 0, None
    for path, t in _tensors(tree):
        data = t.detach()
        data = (data.cpu() if data.device.type != "cpu" else data).contiguous().reshape(-1)
        crc = zlib.crc32(f"{path}|{data.dtype}|{tuple(t.shape)}".encode(), crc)
        if data.numel():
            crc = zlib.crc32(data.view(torch.uint8).numpy(), crc)
        checked = finite is None or path.startswith(finite)
        if bad is None and checked and data.is_floating_point() and not bool(torch.isfinite(data).all()):
            bad = path
        count += 1
    return crc, count, bad


def _first_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc`` (torch reports a failed write as a RuntimeError from inline_container.cc
    whose context is the ``OSError``)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


_VERIFIED: dict[tuple, bool] = {}


def verify_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse (one-line ``ValueError`` naming ``path``) a checkpoint whose tensors are non-finite or whose
    tensors no longer match the CRC-32 stored when it was written (checkpoints without one are accepted)."""
    key = None
    try:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        pass
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
    """``TorchCheckpointIO`` whose saves are atomic (temporary file in the same directory + ``os.replace``),
    refuse non-finite values, carry a CRC-32 of their tensors and report a failed write in one line; loads are
    verified (:func:`verify_checkpoint`)."""

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
            _fsync_dir(path.parent)
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


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a run killed mid-write left: ``checkpoints/.*.tmp``, ``.*.tmp``, ``.hf.*``, ``.tokenizer.*``.

    Only call this from the process that owns ``run_dir`` (rank 0, before training). Returns what was removed.
    """
    root = Path(run_dir)
    stale = (
        list((root / "checkpoints").glob(".*.tmp"))
        + list(root.glob(".*.tmp"))
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
    """Load a Lightning checkpoint safely (``weights_only=True``, tensors memory-mapped) and verify it
    (:func:`verify_checkpoint`); one-line errors."""
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
    verify_checkpoint(ckpt, path)
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
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
        state: dict[str, torch.Tensor] = {}
        for f in files or ["model.safetensors"]:
            try:
                state.update(load_file(str(p / f)))
            except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"init_from {path}: {p / f} is not a readable safetensors file ({first})") from None
        return state
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
    ``info`` (training step, tokens, validation NELBO, ...) is written to ``training_info.json`` (strict JSON:
    NaN becomes ``null``). An existing ``out_dir`` is replaced only once the new export is complete; non-finite
    weights are refused (:class:`~bd3lm.faults.NonFiniteError`) and leave it untouched.
    """
    out = Path(out_dir)
    weights = {**model.state_dict(), **(ema.shadow if ema is not None else {})}
    bad = scan_tensors(weights)[2]
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
