"""Reading a corpus and the validation split rule (the token shards are in :mod:`bd3lm.data.shards`).

Sources (:func:`load_source`, :func:`read_documents`): a ``.txt``/``.txt.gz`` file in the plain-text format below, a
``.jsonl``/``.json``/``.parquet`` file (one document per record, field ``text_field``), a directory of such files of
one kind (walked recursively, **sorted** by path, hidden files skipped), or the name of a Hugging Face Hub dataset
(read with ``datasets.load_dataset(name, split="train")``, from the local HF cache when offline).  Empty and
whitespace-only documents are dropped everywhere.

Plain-text format (also of the embedded Shakespeare corpus :data:`DEFAULT_CORPUS`, one play per document, built by
``data/shakespeare/prepare.py``): UTF-8; documents are separated by a **line containing exactly one form-feed
character** (``"\\f"`` then ``"\\n"``, ``"\\r\\n"`` or the end of the file), the separator belonging to neither
document; a file without such a line is one single document.

Validation rule (the only one, and no seed takes part; :func:`split_documents`, :func:`read_split` and
:func:`bd3lm.data.prepare_shards` all apply it) on the N non-empty documents in source order (files in sorted order,
then line/record order):

* ``valid_docs`` given, or N >= :data:`MIN_DOCS_FOR_DOC_SPLIT` (20): the validation split is the **last** ``n_valid``
  documents, ``n_valid = valid_docs`` if given, else ``round(valid_fraction * N)`` and at least 1 when
  ``valid_fraction > 0``; the first ``N - n_valid`` documents are the training split.
* fewer than 20 documents and no ``valid_docs`` (small corpora): every document is cut in two at a line boundary --
  just after the first ``"\\n"`` at or after character ``ceil(len(doc) * (1 - valid_fraction))`` (or after the last
  ``"\\n"`` before it when there is none) -- the head going to training and the tail to validation; a document
  without a usable line break stays whole in training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

__all__ = ["DEFAULT_CORPUS", "DOC_SEPARATOR", "MIN_DOCS_FOR_DOC_SPLIT", "default_corpus", "load_source", "n_valid_docs",
           "pack", "read_documents", "read_split", "resolve_cache_dir", "source_identity", "split_documents"]

#: Absolute path of the embedded Shakespeare corpus; :func:`default_corpus` checks that it exists.
DEFAULT_CORPUS: str = str(Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "shakespeare.txt.gz")
DOC_SEPARATOR = "\f\n"  # written between the documents of a plain-text corpus (a form-feed line)
MIN_DOCS_FOR_DOC_SPLIT = 20  # from this many documents on, validation holds out whole documents

_KINDS = {".txt": "text", ".txt.gz": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_EXPECTED = ".txt, .txt.gz, .jsonl, .json or .parquet"
_REGENERATE = " (regenerate it with data/shakespeare/prepare.py)"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The data cache: ``cache_dir`` if given, else ``$BD3LM_CACHE_DIR``, else ``<repo>/data/cache``."""
    path = os.path.expanduser(str(cache_dir)) if cache_dir else os.environ.get("BD3LM_CACHE_DIR")
    return Path(path or Path(DEFAULT_CORPUS).parent.parent / "cache").resolve()


def default_corpus() -> str:
    if not os.path.isfile(DEFAULT_CORPUS):
        raise FileNotFoundError(f"embedded corpus not found: {DEFAULT_CORPUS}{_REGENERATE}")
    return DEFAULT_CORPUS


def _kind(path: Path) -> str | None:
    return next((k for suffix, k in _KINDS.items() if path.name.lower().endswith(suffix)), None)


def _data_files(path: str) -> tuple[str, list[Path]]:
    path = os.fspath(path)
    p = Path(os.path.expanduser(path))
    if p.is_file():
        if (kind := _kind(p)) is None:
            raise ValueError(f"unsupported corpus file type {p.name!r}: expected {_EXPECTED}")
        return kind, [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f)
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        kinds = sorted({str(_kind(f)) for f in files})
        if len(kinds) != 1:
            raise ValueError(f"directory {path} mixes corpus file kinds ({', '.join(kinds)}): expected one kind"
                             if kinds else f"no readable documents in {path}: the directory has no {_EXPECTED} files")
        return kinds[0], files
    if path.lower().endswith((*_KINDS, ".gz")) or path.startswith(("/", ".", "~")) or "\\" in path:
        raise FileNotFoundError(f"corpus not found: {path}{_REGENERATE if str(p) == DEFAULT_CORPUS else ''}")
    return "hub", []


def source_identity(path: str) -> dict[str, object]:
    """What identifies a corpus's content: resolved path, size and mtime of each data file, or the hub name."""
    kind, files = _data_files(path)
    if kind == "hub":
        return {"hub": path}
    return {"path": str(Path(os.path.expanduser(path)).resolve()),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _text_docs(files: Iterable[str | Path]) -> Iterator[str]:
    """The non-empty documents of plain-text files, read line by line."""
    for path in files:
        gz = str(path).lower().endswith(".gz")
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            lines, offset = [], 0  # offset: of the current line
            for lineno, raw in enumerate(chain(f, [b"\f"]), 1):  # a last "\f" closes the last document
                if raw in (b"\f\n", b"\f\r\n", b"\f"):  # a line without newline can only be the last one
                    doc, lines = "".join(lines), []
                    if doc.strip():
                        yield doc
                else:
                    try:
                        lines.append(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        where = f"offset {offset + e.start}{' (after decompression)' if gz else ''}, line {lineno}"
                        raise ValueError(f"corpus {path} is not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at "
                                         f"{where}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
                offset += len(raw)


def _text_records(files: list[str], field: str, identity: str) -> Iterator[dict[str, str]]:
    yield from ({field: doc} for doc in _text_docs(files))  # identity: a content stamp, only keys the datasets cache


def _empty(path: str) -> str:
    return f"corpus {path} is empty: it contains no non-whitespace text"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc.__cause__ or exc).split()) or type(exc).__name__


def load_source(path: str, text_field: str = "text", cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """The corpus ``path`` as a memory-mapped ``datasets.Dataset`` with a column ``text_field`` (empty documents
    included); Arrow caches go to ``cache_dir`` (None: the HF default), a hub dataset's to the default HF cache."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    kind, files = _data_files(path)
    cache = None if cache_dir is None else str(cache_dir)
    try:
        if kind == "text":
            if next(_text_docs(files), None) is None:
                raise ValueError(_empty(path))
            stamp = hashlib.sha256(json.dumps(source_identity(path)).encode()).hexdigest()
            ds = datasets.Dataset.from_generator(
                _text_records, datasets.Features({text_field: datasets.Value("string")}), cache_dir=cache,
                gen_kwargs={"files": [str(f) for f in files], "field": text_field, "identity": stamp})
        elif kind == "hub":
            ds = datasets.load_dataset(path, split="train")
        else:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache)
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, ValueError) and str(e.__cause__).startswith("corpus "):
            raise e.__cause__ from None
        raise ValueError(f"could not read corpus {path}: {_one_line(e)}") from None
    except Exception as e:
        if kind != "hub":
            raise
        if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
            raise FileNotFoundError(f"dataset {path!r} is not in the local Hugging Face cache and hub access is "
                                    "disabled (HF_DATASETS_OFFLINE): pass data.path=DIR of jsonl/parquet files"
                                    ) from None
        raise FileNotFoundError(f"could not load dataset {path!r} from the Hugging Face hub: {_one_line(e)}") from None
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {path!r} has no field {text_field!r} (fields: {', '.join(ds.column_names)})")
    return ds


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """All non-empty documents of ``path`` (any source of the module docstring) in source order, in memory (small
    corpora; :func:`bd3lm.data.prepare_shards` streams).  One-line ``FileNotFoundError``/``ValueError``."""
    kind, files = _data_files(path)
    docs = list(_text_docs(files)) if kind == "text" else [
        t for t in load_source(path, text_field)[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(_empty(path))
    return docs


def n_valid_docs(n: int, valid_fraction: float, valid_docs: int | None = None) -> int:
    """How many of ``n`` documents the document-level rule holds out (the last ones)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n_valid = valid_docs if valid_docs is not None else max(1, round(valid_fraction * n)) if valid_fraction else 0
    if not 0 <= n_valid < n:
        raise ValueError(f"cannot hold out {n_valid} of {n} documents: at least one must remain for training")
    return n_valid


def split_documents(docs: Sequence[str], valid_fraction: float = 0.05, seed: int = 0, *,
                    valid_docs: int | None = None) -> tuple[list[str], list[str]]:
    """``(train, valid)`` by the validation rule of the module docstring (``seed``: accepted, unused).  Every
    character ends up in exactly one list (the tail rule drops only whitespace-only pieces)."""
    docs = list(docs)
    if valid_docs is not None or len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
        cut = len(docs) - n_valid_docs(len(docs), valid_fraction, valid_docs)
        return docs[:cut], docs[cut:]
    n_valid_docs(len(docs) + 1, valid_fraction)  # checks valid_fraction
    halves = [(doc[:cut], doc[cut:]) for doc in docs for cut in [_tail_cut(doc, valid_fraction)]]
    return [head for head, _ in halves if head.strip()], [tail for _, tail in halves if tail.strip()]


def _tail_cut(doc: str, valid_fraction: float) -> int:
    target = math.ceil(len(doc) * (1.0 - valid_fraction))
    nl = doc.find("\n", target)
    if nl == -1 or nl + 1 == len(doc):  # no line break at or after the target leaving a non-empty tail
        nl = doc.rfind("\n", 0, target)
    return len(doc) if nl == -1 or valid_fraction == 0 else nl + 1


def read_split(path: str, text_field: str = "text", valid_fraction: float = 0.05,
               valid_docs: int | None = None) -> tuple[list[str], list[str]]:
    """In-memory ``(train, valid)`` documents of a small corpus (BPE training, tests), by the rule above."""
    return split_documents(read_documents(path, text_field), valid_fraction, valid_docs=valid_docs)


def pack(token_ids_per_doc: Sequence[Sequence[int]], model_length: int, *, eos_id: int, bos_id: int | None = None,
         insert_eos: bool = True, chunk_special: bool = False) -> torch.Tensor:
    """Wrap-pack tokenised documents in memory into a ``(n_chunks, model_length)`` long tensor (small corpora):
    the stream ``doc_0 [EOS] doc_1 [EOS] ...`` (EOS when ``insert_eos``) cut into bodies of ``B = model_length``
    tokens, or ``model_length - 2`` when ``chunk_special`` (every chunk then ``[BOS] body [EOS]``, BOS defaulting
    to EOS); only the tail of fewer than ``B`` tokens is dropped.  ``ValueError`` for a stream shorter than ``B``."""
    body = model_length - 2 if chunk_special else model_length
    if body < 1:
        raise ValueError(f"model_length must be >= {3 if chunk_special else 1} (chunk_special={chunk_special}), got "
                         f"{model_length}")
    pieces = chain.from_iterable((d, (eos_id,)) for d in token_ids_per_doc) if insert_eos else token_ids_per_doc
    stream = np.fromiter(chain.from_iterable(pieces), dtype=np.int64)
    if stream.size < body:
        raise ValueError(f"corpus too small to pack: {stream.size} tokens < one chunk of model_length={model_length}"
                         + (f" ({body} body tokens with chunk_special)" if chunk_special else ""))
    chunks = torch.from_numpy(stream[: stream.size // body * body].copy()).view(-1, body)
    if chunk_special:  # [BOS] body [EOS]
        chunks = torch.nn.functional.pad(chunks, (1, 1), value=eos_id)
        chunks[:, 0] = eos_id if bos_id is None else bos_id
    return chunks.contiguous()
