"""Argument handling of ``generate.py``, free of torch: every check here runs before the slow imports.

- :func:`split_text_args`: the text and path options (``prompt=``, ``suffix=``, ``checkpoint=``,
  ``prompts_file=``, ``output=``) are taken verbatim from argv, so Hydra never parses or rewrites them;
- :func:`check_overrides`: the remaining ``key=value`` overrides parse as one value of a known option;
- :func:`check_options`: every option's type and range, as :class:`Options`;
- :func:`read_prompts`, :func:`check_output_path`, :func:`check_checkpoint_files`: the files;
- :func:`unread_prompt_tokens`: how much of a prompt longer than the attention window the model never reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from eval.common import CLIError, checks, one_line

#: Options whose value is text (or a path): taken verbatim from argv, whatever the characters.
TEXT_KEYS = ("prompt", "suffix", "checkpoint", "prompts_file", "output", "tokenizer")
#: dtype names accepted by ``dtype=`` and the torch dtype each one means.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
#: bd3lm.sampling.registry.RULES and bd3lm.sampling.processing.TOP_P_RULES (not imported: they pull in torch).
SAMPLERS = ("first_hitting", "ddpm", "confidence", "analytic", "euler")
TOP_P_RULES = ("hf", "official")
#: Hydra's flags followed by a value (``--cfg job``); ``--info`` takes an optional one.
_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                           "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
_TEXT_ARG = re.compile(r"\+{0,2}(" + "|".join(TEXT_KEYS) + r")=", re.DOTALL)


@dataclass(frozen=True)
class Options:
    """The options of ``generate.py`` (``configs/generate.yaml`` documents each one), checked."""

    checkpoint: str
    tokenizer: str | None
    prompt: str | None
    prompts_file: str | None
    add_bos: bool
    num_samples: int
    max_new_tokens: int | None
    suffix: str | None
    sampler: str | None
    steps: int | None
    threshold: float | None
    temperature: float
    top_k: int
    top_p: float
    top_p_rule: str
    seed: int | None
    stop_at_eos: bool
    stop_entropy: float | None
    kv_cache: bool
    window: int | None
    window_stride: int | None
    streaming: bool
    device: str
    dtype: str
    output: str | None
    stream: bool
    show_steps: bool
    step_delay: float


OPTION_NAMES = tuple(f.name for f in fields(Options))


def split_text_args(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Remove the ``KEY=...`` arguments of :data:`TEXT_KEYS` from ``args`` (argv without the program name).

    Returns ``(other arguments, {key: value})``, the value being everything after the first ``=``, unchanged.
    Raises :class:`CLIError` when a key is given twice.
    """
    rest: list[str] = []
    text: dict[str, str] = {}
    for arg in args:
        match = _TEXT_ARG.match(arg)
        if match is None:
            rest.append(arg)
            continue
        key = match.group(1)
        if key in text:
            hint = " (use prompts_file= for several prompts)" if key == "prompt" else ""
            raise CLIError(f"{key}= is given twice; give it once{hint}")
        text[key] = arg[match.end() :]
    return rest, text


def check_overrides(args: Sequence[str]) -> None:
    """Raise a one-line :class:`CLIError` unless every ``key=value`` in ``args`` sets one known option to one
    value (Hydra's own errors are several lines long). Flags (``--help``, ...) and ``hydra.*`` are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    flag_value = False
    for arg in args:
        if arg.startswith("-") or (flag_value and "=" not in arg):
            flag_value = arg in _HYDRA_FLAGS_WITH_VALUE
            continue
        flag_value = False
        try:
            override = parser.parse_overrides([arg])[0]
        except HydraException as exc:
            raise CLIError(f"cannot parse the option {arg!r}: {one_line(exc)}") from None
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra."):
            continue
        if key not in OPTION_NAMES:
            raise CLIError(f"unknown option {key!r} in {arg!r}; the options are {', '.join(OPTION_NAMES)}")
        if override.is_delete():
            raise CLIError(f"{arg!r}: options cannot be deleted; set {key}=null instead")
        if override.is_sweep_override():
            raise CLIError(
                f"{arg!r} gives {key} several values (a comma separates values); give one value "
                "(decimals are written with a point: 0.5)"
            )


def _int(values: Mapping[str, object], name: str, minimum: int, optional: bool = False) -> int | None:
    value = values.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CLIError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _number(values: Mapping[str, object], name: str, valid, expected: str, optional: bool = False) -> float | None:
    value = values.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(float(value)):
        raise CLIError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def _bool(values: Mapping[str, object], name: str) -> bool:
    value = values.get(name)
    if not isinstance(value, bool):
        raise CLIError(f"{name} must be true or false; got {value!r}")
    return value


def _text(values: Mapping[str, object], name: str) -> str | None:
    value = values.get(name)
    return None if value is None else str(value)


def check_options(values: Mapping[str, object]) -> Options:
    """Check every option of ``values`` (the Hydra config merged with the verbatim text options); raises a
    one-line :class:`CLIError` naming the first bad option, its value and what was expected."""
    checkpoint = _text(values, "checkpoint")
    if checkpoint is None:
        raise CLIError("checkpoint=DIR is required (a directory written by save_pretrained)")
    sampler = values.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise CLIError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)} (or null: the default)")
    top_p_rule = values.get("top_p_rule", "hf")
    if top_p_rule not in TOP_P_RULES:
        raise CLIError(f"top_p_rule must be 'hf' or 'official'; got {top_p_rule!r}")
    dtype = values.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CLIError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    device = values.get("device")
    if not isinstance(device, str) or not device:
        raise CLIError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise CLIError(f"seed must be an integer in [0, 2**63) (or null: a random seed); got {seed!r}")
    return Options(
        checkpoint=checkpoint,
        prompt=_text(values, "prompt"),
        prompts_file=_text(values, "prompts_file"),
        add_bos=_bool(values, "add_bos"),
        num_samples=_int(values, "num_samples", 1),
        max_new_tokens=_int(values, "max_new_tokens", 1, optional=True),
        suffix=_text(values, "suffix"),
        sampler=sampler,
        steps=_int(values, "steps", 1, optional=True),
        threshold=_number(values, "threshold", lambda x: 0 < x <= 1, "in (0, 1]", optional=True),
        temperature=_number(values, "temperature", lambda x: math.isfinite(x) and x >= 0,
                            "a finite number >= 0 (0 = greedy)"),
        top_k=_int(values, "top_k", 0),
        top_p=_number(values, "top_p", lambda x: 0 < x <= 1, "in (0, 1]"),
        top_p_rule=top_p_rule,
        seed=seed,
        stop_at_eos=_bool(values, "stop_at_eos"),
        stop_entropy=_number(values, "stop_entropy", lambda x: math.isfinite(x) and x > 0,
                             "a number of nats > 0 (or null: off)", optional=True),
        kv_cache=_bool(values, "kv_cache"),
        window=_int(values, "window", 1, optional=True),
        window_stride=_int(values, "window_stride", 1, optional=True),
        streaming=_bool(values, "streaming"),
        device=device,
        dtype=dtype,
        tokenizer=_text(values, "tokenizer"),
        output=_text(values, "output"),
        stream=_bool(values, "stream"),
        show_steps=_bool(values, "show_steps"),
        step_delay=_number(values, "step_delay", lambda x: math.isfinite(x) and 0 <= x <= 10, "seconds in [0, 10]"),
    )


def read_prompts(opts: Options) -> list[str] | None:
    """The prompt texts (verbatim), or ``None`` for unconditional generation; one-line :class:`CLIError`s."""
    if opts.prompt is not None and opts.prompts_file is not None:
        raise CLIError("give either prompt= or prompts_file=, not both")
    if opts.prompt is not None:
        if not opts.prompt.strip():
            raise CLIError("prompt is empty; omit prompt= for unconditional generation")
        return [opts.prompt]
    if opts.prompts_file is None:
        return None
    path = os.path.expanduser(opts.prompts_file)
    if not os.path.exists(path):
        raise CLIError(f"prompts_file {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"prompts_file {path!r} is a directory; expected a text file with one prompt per line")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CLIError(f"prompts_file {path!r} cannot be read: {exc.strerror or one_line(exc)}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"prompts_file {path!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    prompts = [line.removesuffix("\r") for line in text.split("\n")]  # only \n ends a line: prompts keep \u2028
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CLIError(f"prompts_file {path!r} contains no prompts (one per non-empty line)")
    return prompts


def check_output_path(output: str) -> Path:
    """``output`` as a path that can be written (missing parent directories are created when writing);
    raises a one-line :class:`CLIError` otherwise. Nothing is created here."""
    if not output:
        raise CLIError("output is empty; give a file path such as output=samples.jsonl")
    path = Path(os.path.expanduser(output))
    if path.is_dir():
        raise CLIError(f"output {output!r} is a directory; expected a file path such as {output}/samples.jsonl")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise CLIError(f"output {output!r} exists and is not a regular file; expected a JSONL file path")
        if not os.access(path, os.W_OK):
            raise CLIError(f"output {output!r} is not writable (read-only file)")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"output {output!r} cannot be created: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"output {output!r} cannot be written: directory {str(parent)!r} is not writable")
    return path


def _check_safetensors(path: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):  # reads and checks the header only (no tensor, no torch)
            pass
    except (SafetensorError, OSError) as exc:
        raise CLIError(
            f"{path!r} is not a complete safetensors file ({one_line(exc)}); the file is truncated or damaged: "
            "export the checkpoint again"
        ) from None


def check_checkpoint_files(checkpoint: str) -> str:
    """``checkpoint`` (user-expanded) if it is a directory with a JSON ``config.json`` and complete safetensors
    weights (headers checked, tensors not read); else a one-line :class:`CLIError` naming the bad file. The
    directory and config checks are the evaluation CLIs' (:func:`bd3lm.evaluation.checks.check_checkpoint`)."""
    try:
        path = checks.check_checkpoint(checkpoint, "checkpoint")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        _check_safetensors(single)
        return path
    try:  # the shared check found the index
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise CLIError(f"{index!r} is not a valid safetensors index ({one_line(exc)})") from None
    for shard in shards:
        _check_safetensors(os.path.join(path, str(shard)))
    return path


def unread_prompt_tokens(length: int, block_size: int, window: int, stride: int, causal: bool) -> int:
    """How many leading tokens of a ``length``-token prompt the sampler's sliding window never attends.

    Zero when the prompt fits the window. Otherwise the first network call (inputs ending at the end of the
    first generated block; AR: at the prompt's end) sees its window start at ``stride * ceil((end - window) /
    stride)``, a multiple of the stride: dropping exactly that many tokens shifts every later window start by the
    same multiple of the stride, so the model reads what it would read from the whole prompt, and the rest
    (fewer than ``window`` tokens) is accepted by :func:`bd3lm.sampling.generate`.
    """
    if length <= window:
        return 0
    end = length if causal else (length // block_size + 1) * block_size
    return stride * -(-(end - window) // stride)
