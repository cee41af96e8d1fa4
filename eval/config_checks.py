"""How an evaluation CLI reads its command line and config, and how it runs.

A CLI is ``main = hydra_main("NAME", run)`` with ``configs/eval/NAME.yaml``: :func:`check_argv` rejects an unknown
key, option or malformed override in one line before Hydra sees the command line, and ``run(cfg)`` starts with
:func:`validate`, which checks every key of the config against the CLI's spec (the checkers of :mod:`eval.common`,
built on :mod:`bd3lm.evaluation.checks`) and checks the files (checkpoint, dataset, output) before a model is loaded.
A user error is one ``error:`` line and exit code 2 (:func:`fail`).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eval.common import CONFIG_DIR, CLIError, one_line

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
