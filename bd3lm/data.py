"""Data layer for BD3-LM: read a corpus, split it, tokenise, pack into fixed-length chunks, cache.

Pipeline (:func:`build_datasets`)::

    read_documents -> split_documents -> tokenizer(batch) -> pack -> safetensors cache

Plain-text corpus format (``.txt`` or ``.txt.gz``, UTF-8), also used by the embedded Shakespeare corpus
(:data:`DEFAULT_CORPUS`, built by ``data/shakespeare/prepare.py``):

* documents are separated by a **line containing exactly one form-feed character** (``"\\f"`` followed by
  ``"\\n"``, ``"\\r\\n"`` or the end of the file); the separator belongs to neither document;
* a file without such a line is **one single document** (no paragraph splitting);
* documents that are empty or whitespace-only are dropped.

The embedded corpus holds the 38 plays of Shakespeare, one document per play, in a readable play format
(``HAMLET:`` then the speech lines, stage directions in brackets).

Packing (:func:`pack`) is "wrap" packing: documents (each followed by EOS when ``insert_eos``) are
concatenated into one token stream, which is cut into consecutive chunks.  The only tokens dropped are the
tail of fewer than one chunk body at the end of the whole stream; no token is dropped or duplicated
anywhere else.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bd3lm.tokenizer import ensure_mask_token, tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_CORPUS",
    "DOC_SEPARATOR",
    "MIN_DOCS_FOR_DOC_SPLIT",
    "ChunkDataset",
    "build_datasets",
    "dataset_cache_path",
    "default_corpus",
    "pack",
    "read_documents",
    "resolve_cache_dir",
    "split_documents",
    "tokenize_documents",
]

logger = logging.getLogger(__name__)

DEFAULT_CORPUS: str = str(
    Path(__file__).resolve().parent.parent / "data" / "shakespeare" / "shakespeare.txt.gz"
)
"""Absolute path of the embedded Shakespeare corpus (``<repo>/data/shakespeare/shakespeare.txt.gz``).
Use :func:`default_corpus` to get it with an existence check."""

DOC_SEPARATOR = "\f\n"
"""The document separator written between documents of a plain-text corpus (a form-feed line)."""

MIN_DOCS_FOR_DOC_SPLIT = 20
""":func:`split_documents` holds out whole documents when there are at least this many documents,
otherwise it holds out the tail of every document."""

CACHE_FORMAT_VERSION = 1
"""Bumped whenever the packing code changes the cached content; part of every cache key."""

_SEPARATOR_RE = re.compile(r"(?:^|(?<=\n))\f(?:\r?\n|\Z)")
_TEXT_SUFFIXES = (".txt", ".txt.gz")
_DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_PATH_SUFFIXES = _TEXT_SUFFIXES + tuple(_DATASET_SUFFIXES) + (".gz",)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The data cache: ``cache_dir`` if given, else ``$BD3LM_CACHE_DIR``, else ``<repo>/data/cache``."""
    if cache_dir:
        return Path(os.path.expanduser(str(cache_dir))).resolve()
    return Path(os.environ.get("BD3LM_CACHE_DIR") or Path(DEFAULT_CORPUS).parent.parent / "cache").resolve()


def default_corpus() -> str:
    """Return :data:`DEFAULT_CORPUS`, raising a one-line ``FileNotFoundError`` when it is missing."""
    if not os.path.isfile(DEFAULT_CORPUS):
        raise FileNotFoundError(
            f"embedded corpus not found: {DEFAULT_CORPUS} (regenerate it with data/shakespeare/prepare.py)"
        )
    return DEFAULT_CORPUS


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_PATH_SUFFIXES) or spec.startswith(("/", ".", "~")) or "\\" in spec


def _split_text(text: str) -> list[str]:
    """Split plain text into documents at form-feed separator lines (see the module docstring)."""
    return [d for d in _SEPARATOR_RE.split(text) if d.strip()]


def _read_text_file(path: Path) -> str:
    """The text of a ``.txt``/``.txt.gz`` file (no newline translation); ``ValueError`` naming the file, the
    line and the byte when it is not UTF-8."""
    gz = path.name.lower().endswith(".gz")
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = " (after decompression)" if gz else ""
        raise ValueError(
            f"corpus {path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at offset {e.start}{where}, "
            f"line {line}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _load_with_datasets(spec: str, text_field: str, **kwargs: object) -> list[str]:
    import datasets

    ds = datasets.load_dataset(spec, split="train", **kwargs)  # type: ignore[arg-type]
    if text_field not in ds.column_names:
        raise ValueError(
            f"dataset {spec!r} has no field {text_field!r} (fields: {', '.join(ds.column_names)})"
        )
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """Read a corpus as a list of non-empty documents.

    Args:
        path: one of
            * a local ``.txt`` / ``.txt.gz`` file in the plain-text corpus format of this module (documents
              separated by form-feed lines; a file without separator is one document);
            * a local ``.jsonl`` / ``.json`` / ``.parquet`` file (or a directory of data files), read with
              ``datasets.load_dataset``, one document per record (field ``text_field``);
            * otherwise, unless ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set, a hub dataset name
              passed to ``datasets.load_dataset(path, split="train")``.
        text_field: the record field holding the text (datasets only).

    Returns:
        The documents, in file order; empty and whitespace-only documents are dropped.

    Raises:
        FileNotFoundError: ``path`` is not an existing local file/directory and is not a loadable hub name
            (a path-like spec, or any name while offline).
        ValueError: unsupported file type, missing ``text_field``, a local file that is not UTF-8 (naming the
            file), or a corpus with no non-whitespace text.
    """
    p = Path(os.path.expanduser(path))
    if p.is_file():
        name = p.name.lower()
        suffix = p.suffix.lower()
        if name.endswith(_TEXT_SUFFIXES):
            docs = _split_text(_read_text_file(p))
        elif suffix in _DATASET_SUFFIXES:
            try:
                docs = _load_with_datasets(_DATASET_SUFFIXES[suffix], text_field, data_files=str(p))
            except UnicodeDecodeError as e:
                raise ValueError(f"corpus {p} is not UTF-8 text ({e.reason} at byte {e.start} of a record)") from None
        else:
            raise ValueError(
                f"unsupported corpus file type {p.name!r}: expected .txt, .txt.gz, .jsonl, .json or .parquet"
            )
    elif p.is_dir():
        docs = _load_with_datasets(str(p), text_field)
    elif _looks_like_path(path) or _offline():
        hint = " (regenerate it with data/shakespeare/prepare.py)" if str(p) == DEFAULT_CORPUS else ""
        offline = (
            " (and hub access is disabled by HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
            if not _looks_like_path(path)
            else ""
        )
        raise FileNotFoundError(f"corpus not found: {path}{hint}{offline}")
    else:
        docs = _load_with_datasets(path, text_field)
    if not docs:
        raise ValueError(f"corpus {path} is empty: it contains no non-whitespace text")
    return docs


def split_documents(
    docs: Sequence[str],
    valid_fraction: float = 0.05,
    seed: int = 0,
    *,
    valid_docs: int | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministically split documents into (train, valid).

    Rule:
        * ``valid_docs`` given, or at least :data:`MIN_DOCS_FOR_DOC_SPLIT` (20) documents: document-level
          split.  ``n_valid = valid_docs`` or ``max(1, round(valid_fraction * len(docs)))`` (0 when
          ``valid_fraction == 0``) documents, chosen with ``random.Random(seed)``, are held out; both lists
          keep the original document order.
        * fewer than 20 documents: every document is cut in two at a line boundary -- just after the first
          ``"\\n"`` at or after character ``ceil(len(doc) * (1 - valid_fraction))`` (or the last
          ``"\\n"`` before it when there is none after) -- the head going to train and the tail to valid.
          A document without any usable line break stays whole in train.  ``seed`` is unused here.

    Every character of every document ends up in exactly one of the two lists; whitespace-only pieces
    are dropped.

    Raises:
        ValueError: ``valid_fraction`` outside ``[0, 1)`` or a ``valid_docs`` that leaves no training
            document.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    docs = list(docs)
    n = len(docs)
    if valid_docs is not None or n >= MIN_DOCS_FOR_DOC_SPLIT:
        if valid_docs is not None:
            n_valid = valid_docs
        else:
            n_valid = 0 if valid_fraction == 0 else max(1, round(valid_fraction * n))
        if not 0 <= n_valid < n:
            raise ValueError(
                f"cannot hold out {n_valid} of {n} documents: at least one must remain for training"
            )
        held = set(random.Random(seed).sample(range(n), n_valid))
        train = [d for i, d in enumerate(docs) if i not in held]
        valid = [d for i, d in enumerate(docs) if i in held]
        return train, valid
    train, valid = [], []
    for doc in docs:
        cut = _tail_cut(doc, valid_fraction)
        if doc[:cut].strip():
            train.append(doc[:cut])
        if doc[cut:].strip():
            valid.append(doc[cut:])
    return train, valid


def _tail_cut(doc: str, valid_fraction: float) -> int:
    """Index where ``doc``'s validation tail starts (``len(doc)`` when nothing is held out)."""
    if valid_fraction == 0:
        return len(doc)
    target = math.ceil(len(doc) * (1.0 - valid_fraction))
    nl = doc.find("\n", target)
    if nl != -1 and nl + 1 < len(doc):
        return nl + 1
    nl = doc.rfind("\n", 0, target)
    return nl + 1 if nl != -1 else len(doc)


def tokenize_documents(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerFast, batch_size: int = 1024
) -> list[list[int]]:
    """Tokenise documents with the fast tokenizer's batch encoding, without adding special tokens."""
    out: list[list[int]] = []
    for i in range(0, len(docs), batch_size):
        out.extend(tokenizer(list(docs[i : i + batch_size]), add_special_tokens=False)["input_ids"])
    return out


def pack(
    token_ids_per_doc: Sequence[Sequence[int]],
    model_length: int,
    *,
    eos_id: int,
    bos_id: int | None = None,
    insert_eos: bool = True,
    chunk_special: bool = False,
) -> torch.Tensor:
    """Wrap-pack tokenised documents into a ``(n_chunks, model_length)`` ``torch.long`` tensor.

    The stream is ``doc_0 [EOS] doc_1 [EOS] ...`` (EOS appended to *every* document when ``insert_eos``,
    nothing inserted otherwise).  It is cut into consecutive bodies of ``B`` tokens, ``B = model_length``,
    or ``B = model_length - 2`` when ``chunk_special``, in which case every chunk is
    ``[BOS] + body + [EOS]`` (``bos_id`` defaults to ``eos_id``).  The tail of fewer than ``B`` tokens at
    the end of the whole stream is dropped -- and only that: the bodies concatenated equal the stream's
    first ``n_chunks * B`` tokens exactly.

    Raises:
        ValueError: ``model_length`` too small, or a stream shorter than one body (the message gives the
            token count and ``model_length``).
    """
    min_len = 3 if chunk_special else 1
    if model_length < min_len:
        raise ValueError(
            f"model_length must be >= {min_len} (chunk_special={chunk_special}), got {model_length}"
        )
    body = model_length - 2 if chunk_special else model_length
    docs = list(token_ids_per_doc)
    extra = 1 if insert_eos else 0
    total = sum(len(d) for d in docs) + extra * len(docs)
    if total < body:
        raise ValueError(
            f"corpus too small to pack: {total} tokens < one chunk of model_length={model_length}"
            + (f" ({body} body tokens with chunk_special)" if chunk_special else "")
        )
    pieces = chain.from_iterable((d, (eos_id,)) for d in docs) if insert_eos else docs
    stream = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=total)
    n_chunks = total // body
    chunks = torch.from_numpy(stream[: n_chunks * body].copy()).view(n_chunks, body)
    if chunk_special:
        bos = eos_id if bos_id is None else bos_id
        chunks = torch.cat(
            [
                torch.full((n_chunks, 1), bos, dtype=torch.long),
                chunks,
                torch.full((n_chunks, 1), eos_id, dtype=torch.long),
            ],
            dim=1,
        )
    return chunks.contiguous()


def _source_identity(path: str) -> dict[str, object]:
    """What identifies the content of a corpus spec: path + size + mtime of each file, or the hub name."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {
            "path": str(p.resolve()),
            "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }
    return {"hub": path}


def dataset_cache_path(
    path: str,
    tokenizer: PreTrainedTokenizerFast,
    model_length: int,
    *,
    cache_dir: str,
    insert_eos: bool = True,
    chunk_special: bool = False,
    valid_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
) -> Path:
    """The cache file :func:`build_datasets` uses for these arguments.

    Its name holds a SHA-256 of every option that changes the content: the corpus identity (resolved path,
    size and mtime of the file(s); the name for a hub dataset), the tokenizer (its full serialised
    vocabulary/merges/added tokens and special ids, see :func:`bd3lm.tokenizer.tokenizer_fingerprint`),
    ``model_length``, ``insert_eos``, ``chunk_special``, ``valid_fraction``, ``seed``, ``text_field`` and
    the cache format version.  Two different settings never share a file.
    """
    ensure_mask_token(tokenizer)
    key = {
        "version": CACHE_FORMAT_VERSION,
        "source": _source_identity(path),
        "tokenizer": hashlib.sha256(tokenizer_fingerprint(tokenizer).encode("utf-8")).hexdigest(),
        "model_length": int(model_length),
        "insert_eos": bool(insert_eos),
        "chunk_special": bool(chunk_special),
        "valid_fraction": float(valid_fraction),
        "seed": int(seed),
        "text_field": text_field,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).name.split(".")[0])[:40] or "corpus"
    return Path(cache_dir) / f"{stem}-L{model_length}-{digest}.safetensors"


def _check_no_mask(name: str, chunks: torch.Tensor, mask_id: int) -> None:
    count = int((chunks == mask_id).sum())
    if count:
        raise ValueError(
            f"{name} data contains the mask id {mask_id} {count} times (a literal mask token in the text?)"
        )


def build_datasets(
    path: str,
    tokenizer: PreTrainedTokenizerFast,
    model_length: int,
    *,
    cache_dir: str,
    insert_eos: bool = True,
    chunk_special: bool = False,
    valid_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read, split, tokenise and pack a corpus into ``(train, valid)`` long tensors ``(N, model_length)``.

    Results are cached in ``cache_dir`` as one safetensors file (tensors ``train`` and ``valid``, options in
    its metadata) named by :func:`dataset_cache_path`; a later call with the same options loads it without
    reading the corpus.  The file is written atomically (temporary file + ``os.replace``).

    BOS/EOS are the tokenizer's; the tokenizer gets a mask token if it has none (:func:`ensure_mask_token`).
    ``valid`` is ``(0, model_length)`` when ``valid_fraction == 0``.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_documents` and :func:`pack`; ``ValueError`` also
            when the mask id would appear in the packed data (e.g. the literal mask token in the text, or
            EOS/BOS equal to the mask).
    """
    mask_id = ensure_mask_token(tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no EOS token")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    cache_file = dataset_cache_path(
        path,
        tokenizer,
        model_length,
        cache_dir=cache_dir,
        insert_eos=insert_eos,
        chunk_special=chunk_special,
        valid_fraction=valid_fraction,
        seed=seed,
        text_field=text_field,
    )
    if cache_file.is_file():
        logger.info("data cache hit: %s", cache_file)
        with safe_open(str(cache_file), framework="pt") as f:
            return f.get_tensor("train"), f.get_tensor("valid")
    logger.info("data cache miss: building %s", cache_file)
    if mask_id in (eos_id, bos_id) and (insert_eos or chunk_special):
        raise ValueError(f"tokenizer EOS/BOS id equals the mask id {mask_id}")

    train_docs, valid_docs = split_documents(read_documents(path, text_field), valid_fraction, seed)

    def pack_split(name: str, docs: list[str]) -> torch.Tensor:
        if not docs:
            return torch.empty((0, model_length), dtype=torch.long)
        ids = tokenize_documents(docs, tokenizer)
        try:
            return pack(
                ids,
                model_length,
                eos_id=eos_id,
                bos_id=bos_id,
                insert_eos=insert_eos,
                chunk_special=chunk_special,
            )
        except ValueError as e:
            raise ValueError(f"{name} split of {path}: {e}") from None

    train = pack_split("train", train_docs)
    valid = pack_split("valid", valid_docs)
    _check_no_mask("train", train, mask_id)
    _check_no_mask("valid", valid, mask_id)

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "path": str(path),
        "model_length": str(model_length),
        "insert_eos": str(insert_eos),
        "chunk_special": str(chunk_special),
        "valid_fraction": str(valid_fraction),
        "seed": str(seed),
        "text_field": text_field,
        "mask_id": str(mask_id),
    }
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"train": train, "valid": valid}, tmp, metadata=meta)
        os.replace(tmp, cache_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return train, valid


class ChunkDataset(torch.utils.data.Dataset):
    """A map-style dataset over packed chunks, a ``(N, L)`` long tensor.

    Item ``i`` is ``{"input_ids": chunks[i], "attention_mask": ones(L)}`` (packed data has no padding), or
    just ``chunks[i]`` when ``as_dict=False``.
    """

    def __init__(self, chunks: torch.Tensor, as_dict: bool = True) -> None:
        if chunks.dim() != 2:
            raise ValueError(f"chunks must be a 2-D (N, L) tensor, got shape {tuple(chunks.shape)}")
        self.chunks = chunks.long()
        self.as_dict = as_dict
        self._ones = torch.ones(chunks.shape[1], dtype=torch.long)

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | torch.Tensor:
        row = self.chunks[index]
        if not self.as_dict:
            return row
        return {"input_ids": row, "attention_mask": self._ones.clone()}
