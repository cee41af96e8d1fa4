"""Argument checks shared by the evaluation functions and the ``eval/`` CLIs: each returns the value (normalised)
or raises a one-line ``ValueError`` naming the argument, the bad value and what was expected.

Standard library only, and nothing from ``bd3lm``: ``eval/common.py`` loads this file on its own (the ``bd3lm``
package imports torch) so that the CLIs check every argument and file before any slow import or model load.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import os
from collections.abc import Callable, Iterable

__all__ = [
    "BOOL_WORDS", "CHECKPOINT_WEIGHTS", "DATASET_SUFFIXES", "TOKENIZER_FILES", "check_bool", "check_checkpoint",
    "check_choice", "check_dataset", "check_int", "check_list", "check_number", "check_output", "check_text",
]

#: Weight files of a checkpoint directory (as :data:`bd3lm.checkpoint.WEIGHT_FILES`).
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: Any of these marks a saved tokenizer (as ``bd3lm.evaluation.corpora``'s check).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
#: Corpus files :func:`bd3lm.data.read_documents` reads.
DATASET_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".json", ".parquet")
#: Bytes of a text corpus decoded up front (a binary or mis-encoded file shows in its first megabyte).
_SNIFF_BYTES = 1 << 20


def check_int(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]`` (bools rejected), else a one-line ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {expected}; got {value!r}")
    return value


def check_number(value: object, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number within the bounds (``None`` = unbounded; ``*_open`` excludes
    the bound), else a one-line ``ValueError`` stating the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            expected = "a finite number"
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


#: Words a command line may give for a boolean (``check_bool(..., words=True)``), case-insensitive.
BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False}


def check_bool(value: object, name: str, words: bool = False) -> bool:
    """``value`` if it is ``True`` or ``False`` (with ``words``, also one of :data:`BOOL_WORDS`); anything else, a
    truthy word or a number included, is a one-line ``ValueError`` (never a silent default)."""
    if words and isinstance(value, str) and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false{' (or on/off)' if words else ''}; got {value!r}")
    return value


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a one-line ``ValueError`` listing them."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_text(value: object, name: str) -> str:
    """``value`` as text: a string, or a number the command line parsed as one (``prompt=42``)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{name} must be text; got {value!r}")
    return str(value)


def check_list(value: object, name: str, check: Callable[[object, str], object], example: str, *,
               empty: bool = False) -> list:
    """``value`` as a list (non-empty unless ``empty``), every item passed through ``check(item, "every value of
    NAME")``."""
    items = None if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable) else list(value)
    if items is None or not (items or empty):
        raise ValueError(f"{name} must be a {'' if empty else 'non-empty '}list such as {example}; got {value!r}")
    return [check(v, f"every value of {name}") for v in items]


def _path(value: object, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path; got {value!r}")
    return os.path.expanduser(os.fspath(value))


def check_checkpoint(value: object, name: str = "checkpoint", *, tokenizer: bool = False) -> str:
    """``value`` (user-expanded) if it is a checkpoint directory: ``config.json`` holding a JSON object, safetensors
    weights and, with ``tokenizer``, the saved tokenizer; else a one-line ``ValueError`` naming the bad file.
    Reads only ``config.json`` (no weights, no torch)."""
    path = _path(value, name)
    if not os.path.exists(path):
        raise ValueError(f"{name} directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is not a directory (expected a directory written by save_pretrained)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{name} directory {path!r} has no config.json (expected the Hugging Face layout)")
    try:
        with open(config, encoding="utf-8") as fh:
            parsed = json.load(fh)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{name} {config!r} is not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} {config!r} holds a JSON {type(parsed).__name__}, not an object of config fields")
    if not any(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_WEIGHTS):
        raise ValueError(f"{name} directory {path!r} has no model.safetensors (expected safetensors weights; "
                         "pickled .bin/.ckpt files are not loaded)")
    if tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{name} {path!r} has no tokenizer (tokenizer.json): evaluation needs the tokenizer the "
                         "model was trained with (train.py saves it in run_dir/hf)")
    return path


def _sniff_text(path: str, name: str, compressed: bool) -> None:
    """Decode the first megabyte of ``path`` as UTF-8 (an incomplete last character is fine)."""
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            head = fh.read(_SNIFF_BYTES)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} {path!r} is not UTF-8 text (byte 0x{head[exc.start]:02x} at offset "
                         f"{exc.start}); expected a UTF-8 .txt/.jsonl corpus") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{name} {path!r} cannot be read: {' '.join(str(exc).split())}") from None


def _first_record(path: str, name: str, text_field: str) -> None:
    """The first record of a .jsonl file must be a JSON object holding ``text_field``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        line = next((ln for ln in fh if ln.strip()), None)
    if line is None:
        raise ValueError(f"{name} {path!r} is empty: it holds no JSON records")
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{name} {path!r} is not JSON Lines: its first record does not parse "
                         f"({' '.join(str(exc).split())})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{name} {path!r}: its first record is a JSON {type(record).__name__}, not an object")
    if text_field not in record:
        raise ValueError(f"{name} {path!r} has no field {text_field!r} in its first record (fields: "
                         f"{', '.join(map(str, record)) or 'none'}); set text_field=")


def check_dataset(value: object, name: str = "dataset", text_field: str | None = None) -> str:
    """``value`` (user-expanded) if it is a corpus :func:`bd3lm.data.read_documents` can read: a readable
    .txt/.txt.gz/.jsonl/.json file whose first megabyte is UTF-8 (a .jsonl file's first record holding
    ``text_field``, when given), a .parquet file, or a directory holding such files; else a one-line
    ``ValueError``."""
    path = _path(value, name)
    expected = f"a local {'/'.join(DATASET_SUFFIXES)} file or a directory of them"
    if not os.path.exists(path):
        raise ValueError(f"{name} {path!r} does not exist ({expected})")
    if os.path.isdir(path):
        found = any(f.lower().endswith(DATASET_SUFFIXES) for _, _, files in os.walk(path) for f in files)
        if not found:
            raise ValueError(f"{name} {path!r} is a directory with no data files ({expected})")
        return path
    lower = path.lower()
    if not os.path.isfile(path) or not lower.endswith(DATASET_SUFFIXES):
        raise ValueError(f"{name} {path!r} is not a supported corpus file ({expected})")
    if lower.endswith(".parquet"):
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise ValueError(f"{name} {path!r} cannot be read: {' '.join(str(exc).split())}") from None
        if magic != b"PAR1":
            raise ValueError(f"{name} {path!r} is not a Parquet file (it does not start with PAR1)")
        return path
    _sniff_text(path, name, compressed=lower.endswith(".gz"))
    if text_field is not None and lower.endswith(".jsonl"):
        _first_record(path, name, text_field)
    return path


def check_output(value: object, name: str = "output", suffixes: Iterable[str] = ("",)) -> str:
    """``value`` (user-expanded) if the files ``value + suffix`` can be written (missing parent directories are
    created later); else a one-line ``ValueError``. Nothing is created here."""
    path = _path(value, name)
    for suffix in suffixes:
        target = path + suffix
        if os.path.isdir(target):
            raise ValueError(f"{name} {target!r} is a directory; expected a file path")
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise ValueError(f"{name} {target!r} is not writable")
        parent = os.path.dirname(os.path.abspath(target))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{name} {target!r} cannot be created: {parent!r} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {target!r} cannot be written: directory {parent!r} is not writable")
    return path
