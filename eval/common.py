"""What every evaluation CLI shares: argument checks that run before any slow import, one-line errors (exit code
2), atomic JSON/text output, the environment record.

A CLI is ``main = hydra_main("NAME", run)`` with ``configs/eval/NAME.yaml``: :func:`check_argv` rejects an unknown
key, option or malformed override in one line before Hydra sees the command line, and ``run(cfg)`` starts with
:func:`validate`, which checks every key of the config against the CLI's spec (the checkers below, built on
:mod:`bd3lm.evaluation.checks`) and checks the files (checkpoint, dataset, output) before a model is loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
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


def _load_checks():
    """:mod:`bd3lm.evaluation.checks` without importing the ``bd3lm`` package (whose ``__init__`` imports torch):
    the module itself needs only the standard library. Reused when the package is already imported."""
    if "bd3lm.evaluation.checks" in sys.modules:
        return sys.modules["bd3lm.evaluation.checks"]
    spec = importlib.util.find_spec("bd3lm")  # a top-level package: found, not imported
    path = Path(spec.origin).parent / "evaluation" / "checks.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        import bd3lm.evaluation.checks as checks

        return checks
    mod_spec = importlib.util.spec_from_file_location("_bd3lm_evaluation_checks", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


checks = _load_checks()


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


# ----------------------------------------------------------------------------------------------- config checks


def _get(cfg, key: str, path: str):
    from omegaconf.errors import OmegaConfBaseException

    try:
        return cfg[key]
    except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
        raise CLIError(f"{path} cannot be resolved: {one_line(exc)}") from None


def validate(cfg, spec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check every key of ``cfg`` with its checker in ``spec`` (nested dicts for groups); returns the normalised
    values as plain Python and writes them back into ``cfg``. A key of ``cfg`` not in ``spec`` (``+key=``) or a
    group given a plain value is a :class:`CLIError`; the first bad key stops."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, (DictConfig, dict)):
        raise CLIError(f"{prefix.rstrip('.')} is a group of settings; set its keys, e.g. "
                       f"{prefix}{next(iter(spec))}=...; got {cfg!r}")
    unknown = [k for k in cfg if k not in spec and k != "hydra"]
    if unknown:
        raise CLIError(_unknown(f"{prefix}{unknown[0]}", [f"{prefix}{k}" for k in spec]))
    out: dict[str, Any] = {}
    for key, check in spec.items():
        name = f"{prefix}{key}"
        if key not in cfg:
            raise CLIError(f"{name} is missing from the config (see configs/eval/)")
        value = _get(cfg, key, name)
        if isinstance(check, Mapping):
            out[key] = validate(value, check, f"{name}.")
            continue
        if isinstance(value, DictConfig):
            raise CLIError(f"{name} must be a single value; got a group {OmegaConf.to_container(value)!r}")
        out[key] = check(value, name)
        cfg[key] = out[key]
    return out


def _unknown(key: str, known: Sequence[str], where: str = "") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; the keys are {', '.join(known)}"
    return f"unknown key {key!r}{where}{hint}"


#: Hydra's own command-line flags (``python -m eval.X --help`` etc.); with one of them Hydra handles the run.
HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name",
               "-cn", "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


_MISSING = object()


def _keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out = []
    for k, v in node.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"]
    return out


def check_argv(config_name: str, args: Sequence[str]) -> None:
    """Raise a one-line :class:`CLIError` unless every argument of ``args`` sets one key of
    ``configs/eval/CONFIG_NAME.yaml`` to one value. Hydra's flags (``--help``, ``--cfg job``, ...) and ``hydra.*``
    overrides are left to Hydra; any other ``--option`` is an error (settings are ``key=value``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    if any(a.split("=", 1)[0] in HYDRA_FLAGS for a in args):
        return
    cfg = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")
    for k in ("defaults", "hydra"):
        cfg.pop(k, None)
    known = _keys(cfg)
    where = f" for eval.{config_name} (see configs/eval/{config_name}.yaml)"
    parser = OverridesParser.create()
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
            value = arg.split("=", 1)[1] if "=" in arg else (
                args[i + 1] if i + 1 < len(args) and "=" not in args[i + 1] else "VALUE")
            hint = f"; did you mean {key}={value}?" if key in known else ""
            raise CLIError(f"unknown option {arg!r}: eval.{config_name} takes key=value settings "
                           f"(see configs/eval/{config_name}.yaml){hint}")
        try:
            override = parser.parse_overrides([arg])[0]
        except HydraException as exc:
            raise CLIError(f"cannot parse {arg!r}: expected key=value ({one_line(exc)})") from None
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        node = OmegaConf.select(cfg, key, default=_MISSING)
        if node is _MISSING:
            raise CLIError(_unknown(key, known, where))
        if override.is_delete():
            raise CLIError(f"{arg!r}: keys cannot be deleted; set {key}=null or another value instead")
        if override.type.name == "ADD":
            raise CLIError(f"{arg!r}: {key} already exists; set it with {key}=VALUE (no '+')")
        if override.is_sweep_override():
            raise CLIError(f"{arg!r} gives {key} several values (Hydra reads a comma as a list of runs); give one "
                           f"value, a list in brackets ({key}=[a,b]), or quote text with commas ({key}='\"a, b\"')")
        if isinstance(node, DictConfig) and not isinstance(override.value(), dict):
            raise CLIError(f"{key} is a group of settings; set its keys, e.g. {_keys(node, key + '.')[0]}=VALUE")


# ---------------------------------------------------------------------------------------------------- running


def fail(exc: BaseException) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    sys.exit(2)


def cli_main(fn: Callable, cfg) -> None:
    """Run ``fn(cfg)``; a user error (bad value, missing file or extra) is one ``error:`` line and exit 2."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        fn(cfg)
    except (CLIError, ValueError, FileNotFoundError, ImportError, OSError, OmegaConfBaseException) as exc:
        fail(exc)


def hydra_main(config_name: str, fn: Callable) -> Callable[[Sequence[str] | None], None]:
    """The ``main(argv=None)`` of a CLI: :func:`check_argv` on ``argv`` (default ``sys.argv[1:]``), then Hydra
    composes ``configs/eval/CONFIG_NAME.yaml`` with it and :func:`cli_main` runs ``fn(cfg)``."""
    import hydra

    def task(cfg) -> None:
        cli_main(fn, cfg)

    task.__module__ = f"eval.{config_name}"  # Hydra names the app (--help) after the task function's module
    task = hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name=config_name)(task)

    def main(argv: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if argv is None else argv)
        try:
            check_argv(config_name, args)
        except CLIError as exc:
            fail(exc)
        saved = sys.argv
        sys.argv = [saved[0] if saved else f"eval.{config_name}", *args]
        try:
            task()
        finally:
            sys.argv = saved

    return main


# ------------------------------------------------------------------------------------------------------ output


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
