"""What every evaluation CLI shares: argument checks that run before any slow import, one-line errors (exit code
2), atomic JSON/text output, the environment record.

The checkers below (built on :mod:`bd3lm.evaluation.checks`) make up each CLI's spec; :mod:`eval.config_checks`
applies a spec to the command line and the config (``hydra_main``, ``check_argv``, ``validate``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs" / "eval"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # no bars: a failed run's stderr is its error line


class CLIError(ValueError):
    """A user error, reported as one ``error:`` line with exit code 2."""


def _torch_free(name: str):
    """The ``bd3lm`` module ``name`` (one that needs only the standard library) without importing the ``bd3lm``
    package, whose ``__init__`` imports torch: the CLIs check their arguments before torch is loaded. Reused when
    the package is already imported."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("bd3lm")  # a top-level package: found, not imported
    path = Path(spec.origin).parent.joinpath(*name.split(".")[1:]).with_suffix(".py") if spec and spec.origin else None
    if path is None or not path.is_file():
        return importlib.import_module(name)
    mod_spec = importlib.util.spec_from_file_location("_" + name.replace(".", "_"), path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


checks = _torch_free("bd3lm.evaluation.checks")
atomic = _torch_free("bd3lm.atomic")
faults = _torch_free("bd3lm.faults")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _cli(check: Callable, *args, **kwargs):
    """``check(*args, **kwargs)`` with its ``ValueError`` re-raised as a :class:`CLIError` (same message)."""
    try:
        return check(*args, **kwargs)
    except CLIError:
        raise
    except ValueError as exc:
        raise CLIError(one_line(exc)) from None


# --------------------------------------------------------------------------------------------- value checkers
# A checker is ``check(value, key) -> normalised value`` raising :class:`CLIError`; a spec maps each key of a CLI's
# config to its checker (a nested dict for a group such as ``perf:``).

Checker = Callable[[object, str], Any]


def check_int(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]`` (bools rejected), else a :class:`CLIError`."""
    return _cli(checks.check_int, value, name, minimum, maximum)


def integer(minimum: int = 1, maximum: int | None = None) -> Checker:
    return lambda value, name: check_int(value, name, minimum, maximum)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Checker:
    return lambda value, name: _cli(checks.check_number, value, name, low, high, low_open=low_open,
                                    high_open=high_open)


def boolean(value: object, name: str) -> bool:
    """``true``/``false`` (or on/off, yes/no); any other value is an error naming it."""
    return _cli(checks.check_bool, value, name, words=True)


def choice(*choices: str) -> Checker:
    return lambda value, name: _cli(checks.check_choice, value, name, choices)


def text(value: object, name: str) -> str:
    return _cli(checks.check_text, value, name)


def optional(check: Checker) -> Checker:
    """``check``, with ``null`` allowed (kept as ``None``)."""
    return lambda value, name: None if value is None else check(value, name)


def list_of(check: Checker, example: str, single: bool = True, empty: bool = False) -> Checker:
    """A list (non-empty unless ``empty``), every item passed through ``check``; with ``single``, one plain value
    counts as a list of one (``cache=false``)."""

    def checker(value: object, name: str) -> list:
        from omegaconf import ListConfig

        items = list(value) if isinstance(value, ListConfig) else value
        if single and not isinstance(items, (list, tuple, dict)) and items is not None:
            items = [items]
        return _cli(checks.check_list, items, name, check, example, empty=empty)

    return checker


def checkpoint(tokenizer: bool = True) -> Checker:
    """A checkpoint directory (config.json a JSON object, safetensors weights, with ``tokenizer`` the tokenizer);
    required (wrap in :func:`optional` to allow ``null``)."""

    def checker(value: object, name: str) -> str:
        if value is None or value == "":
            extra = ", with its tokenizer" if tokenizer else ""
            raise CLIError(f"{name}=DIR is required (a directory written by save_pretrained{extra})")
        return _cli(checks.check_checkpoint, value, name, tokenizer=tokenizer)

    return checker


def dataset(value: object, name: str, text_field: str | None = None) -> str:
    """A local corpus file or directory (see :func:`bd3lm.evaluation.checks.check_dataset`)."""
    return _cli(checks.check_dataset, value, name, text_field)


def output(*suffixes: str) -> Checker:
    """An output path; with ``suffixes`` a stem (``STEM.json``, ``STEM.md``), each file checked."""
    return lambda value, name: _cli(checks.check_output, value, name, suffixes or ("",))


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def device(value: object, name: str) -> str:
    """A device name (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``); checked against the machine by
    :func:`eval.bench.resolve_device` once torch is imported."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise CLIError(f"{name} must be cpu, cuda, cuda:N, mps or auto; got {value!r}")
    return value


def judge(value: object, name: str) -> str:
    """A judge: ``smollm2``, a .gguf file, or a local model directory (loaded offline later); a path that does
    not exist is an error now."""
    spec = text(value, name)
    if not spec:
        raise CLIError(f"{name} is empty; give smollm2, a .gguf file or a model directory")
    path = os.path.expanduser(spec)
    if spec.endswith(".gguf") and not os.path.isfile(path):
        raise CLIError(f"{name} GGUF file {path!r} does not exist")
    if spec.startswith(("/", ".", "~")) and not os.path.exists(path):
        raise CLIError(f"{name} {path!r} does not exist (expected smollm2, a .gguf file or a model directory)")
    return spec


#: Rule names of :data:`bd3lm.sampling.registry.RULES` and top-p rules of :mod:`bd3lm.sampling.processing` (not
#: imported: they pull in torch; tests/test_eval_inputs.py checks they agree).
SAMPLERS = ("first_hitting", "ddpm", "confidence", "analytic", "euler")
TOP_P_RULES = ("hf", "official")
#: Samplers that take steps= (:data:`bd3lm.sampling.registry.STEPPED`).
STEPPED = ("ddpm", "analytic", "euler")


def check_sampler_options(a: Mapping[str, Any]) -> None:
    """The checks of :func:`bd3lm.sampling.registry.make_rule` and ``generate`` that need no model: ``steps`` only
    with a stepped sampler and ``threshold`` only with ``confidence`` (when ``sampler`` is named), ``streaming``
    only with the cache."""
    sampler = a.get("sampler")
    if sampler is not None and a.get("steps") is not None and sampler not in STEPPED:
        raise CLIError(f"steps={a['steps']} applies only to sampler {', '.join(STEPPED)}; got sampler={sampler}")
    if sampler is not None and a.get("threshold") is not None and sampler != "confidence":
        raise CLIError(f"threshold={a['threshold']} applies only to sampler=confidence; got sampler={sampler}")
    if a.get("streaming") and a.get("kv_cache") is False:
        raise CLIError("streaming=true keeps stale cache entries; it needs kv_cache=true")


#: Keys every CLI with a device shares.
RUNTIME = {"seed": integer(0), "device": device, "threads": optional(integer())}


# ------------------------------------------------------------------------------------------------------ output


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (:func:`bd3lm.atomic.write_text_atomic`: a temporary file beside it, then a
    rename)."""
    return atomic.write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (:func:`bd3lm.faults.dumps`: non-finite floats become null), written atomically."""
    return write_text(path, faults.dumps(obj, indent=2, default=str) + "\n")


def write_report(stem: str | os.PathLike | None, payload: dict, markdown: str) -> None:
    """Print ``markdown``; with a ``stem``, also write ``STEM.json`` (``payload``) and ``STEM.md``."""
    print(markdown)
    if stem:
        write_json(f"{stem}.json", payload)
        write_text(f"{stem}.md", markdown)


def set_threads(threads) -> None:
    """``torch.set_num_threads``: ``threads`` is a validated integer, or a config whose ``threads`` key is checked
    here; ``None`` keeps torch's default."""
    if threads is not None and not isinstance(threads, int):
        threads = threads.get("threads")
        threads = None if threads is None else check_int(threads, "threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def checkpoint_of(cfg, tokenizer: bool = True) -> Path:
    """``cfg.checkpoint`` as a checked checkpoint directory (see :func:`checkpoint`), else a :class:`CLIError`."""
    if cfg.checkpoint is None:
        raise CLIError("checkpoint=DIR is required (a directory written by save_pretrained, with its tokenizer)")
    return Path(checkpoint(tokenizer)(cfg.checkpoint, "checkpoint"))


def positive_int(cfg, key: str) -> int:
    """``cfg[key]`` as an integer >= 1, else a :class:`CLIError` naming the key and the value."""
    return check_int(cfg[key], key)
