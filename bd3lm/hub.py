"""Resolve a checkpoint name to a local directory: a local path, or a Hugging Face Hub id through the Hub cache.

The order is the one transformers uses: an existing local directory wins (and a missing one whose parent directory
exists is reported as missing, not looked up: ``runs/hf`` mistyped); otherwise a valid Hub id
(``"org/name"`` or ``"name"``) is looked up in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, or
``cache_dir``) with :func:`huggingface_hub.snapshot_download` (``local_files_only=True``), and downloaded only when
it is not cached and the Hub is not offline (``HF_HUB_OFFLINE`` / ``local_files_only``). Only the files a
checkpoint needs are fetched: ``config.json``, safetensors weights and tokenizer files (never pickled ``.bin``
files or remote code).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_FILES", "resolve_model_dir"]

#: Files fetched from the Hub: the config, safetensors weights (single file or shards with their index) and the
#: tokenizer's files when the repository has them (the official BD3-LM repositories do not: they use GPT-2's).
HUB_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _complete(folder: Path) -> bool:
    """The snapshot holds a config and weights (a snapshot can be partial, e.g. only config.json)."""
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return (folder / "config.json").is_file() and has_weights


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local directory of checkpoint ``name_or_path``: the directory itself if it exists, else the snapshot
    of the Hub model ``name_or_path`` in the Hugging Face cache (downloaded first unless offline).

    Args:
        name_or_path: a checkpoint directory, or a Hub model id such as ``"kuleshov-group/bd3lm-owt-block_size4"``.
        revision: branch, tag or commit of the Hub model (default ``main``); ignored for a local directory.
        cache_dir: Hub cache to use instead of the default (``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
        local_files_only: never download (as ``HF_HUB_OFFLINE=1``).
        token: Hub token for a private or gated model (default: the one ``huggingface_hub`` finds itself).

    Returns:
        The directory. A local directory is returned as given (not checked for its files); a Hub snapshot
        holds ``config.json`` and safetensors weights.

    Raises:
        FileNotFoundError: one line: the path does not exist and is no Hub id, or the model is not in the local
            cache and downloading is off (offline), or the cached snapshot lacks its weights.
        OSError: one line: the download failed (no network, unknown or gated repository, bad revision).
    """
    name = os.fspath(name_or_path)
    if not isinstance(name, str):
        raise TypeError(f"name_or_path must be a directory path or a Hub model id (str); got {name_or_path!r}")
    if os.path.isdir(name):
        return Path(name)
    if os.path.exists(name):
        raise FileNotFoundError(
            f"checkpoint {name!r} is a file; expected a checkpoint directory (config.json + model.safetensors) "
            "or a Hugging Face Hub model id"
        )
    parent = os.path.dirname(name)
    if parent and os.path.isdir(parent):  # `runs/hf` mistyped: a local path, never a Hub id to fetch
        raise FileNotFoundError(
            f"checkpoint directory {name!r} does not exist (its parent {parent!r} is a local directory, so the "
            "name is not looked up on the Hugging Face Hub)"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist") from None
    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    where = f"{name!r}" + ("" if revision is None else f" (revision {revision!r})")
    common = dict(revision=revision, cache_dir=cache_dir, allow_patterns=list(HUB_FILES), token=token)
    try:
        folder = Path(snapshot_download(name, local_files_only=True, **common))
    except LocalEntryNotFoundError:  # also an incomplete snapshot whose file listing is cached
        folder = None
    if folder is not None and _complete(folder):
        return folder
    offline = bool(local_files_only or constants.HF_HUB_OFFLINE)
    if offline:
        state = "is not in the local Hugging Face cache" if folder is None else "has no weights in the local cache"
        switch = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise FileNotFoundError(
            f"model {where} is not a local directory and {state} ({cache}); {switch}, so nothing is downloaded: "
            f"run `hf download {name}` with network access first, or pass a checkpoint directory"
        )
    try:
        folder = Path(snapshot_download(name, **common))
    except Exception as err:  # network, unknown/gated repository, bad revision: one line, the cause chained
        raise OSError(
            f"could not download model {where} from the Hugging Face Hub into {cache}: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err
    if not _complete(folder):
        raise FileNotFoundError(
            f"Hub model {where} has no config.json and model.safetensors (expected the Hugging Face layout with "
            "safetensors weights; pickled .bin files are not loaded)"
        )
    return folder
