"""What every evaluation CLI shares: one-line errors, atomic JSON/text output, the environment record."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CLIError(ValueError):
    """A user error, reported as one ``error:`` line with exit code 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _finite(obj):
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False, default=str) + "\n")


def write_report(stem: str | os.PathLike | None, payload: dict, markdown: str) -> None:
    """Print ``markdown``; with a ``stem``, also write ``STEM.json`` (``payload``) and ``STEM.md``."""
    print(markdown)
    if stem:
        write_json(f"{stem}.json", payload)
        write_text(f"{stem}.md", markdown)


def checkpoint_of(cfg) -> Path:
    """``cfg.checkpoint`` as an existing directory (checked before any slow import), else a :class:`CLIError`."""
    if cfg.checkpoint is None:
        raise CLIError("checkpoint=DIR is required (a directory written by save_pretrained, with its tokenizer)")
    path = Path(os.path.expanduser(str(cfg.checkpoint)))
    if not path.is_dir():
        raise CLIError(f"checkpoint directory {str(path)!r} does not exist")
    return path


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools rejected), else a :class:`CLIError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CLIError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def positive_int(cfg, key: str) -> int:
    """``cfg[key]`` as an integer >= 1, else a :class:`CLIError` naming the key and the value."""
    return check_int(cfg[key], key)


def set_threads(cfg) -> None:
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(positive_int(cfg, "threads"))


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cli_main(fn: Callable, cfg) -> None:
    """Run ``fn(cfg)``; a user error (bad value, missing file or extra) is one ``error:`` line and exit 2."""
    try:
        fn(cfg)
    except (CLIError, ValueError, FileNotFoundError, ImportError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
