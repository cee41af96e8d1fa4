"""Token shards: a corpus tokenised once, in parallel and with bounded memory, into flat files read memory-mapped.

A shard directory (``<cache_dir>/<stem>-L<model_length>-<digest>``, see :func:`shard_dir_for`) holds::

    index.json        format version, dtype, model_length, EOS/mask ids, vocabulary size, tokenizer hash, the
                      ShardOptions, the source identity and, per split: its shard files with their token counts,
                      the number of chunks and of documents, the tokens dropped
    train-00000.bin   raw little-endian uint16/uint32 tokens, no header; then train-00001.bin, ..., valid-00000.bin

Each split is the packed stream ``doc_0 EOS doc_1 EOS ...`` of its documents (EOS after every document when
``insert_eos``; documents and split rule as in :mod:`bd3lm.data.corpus`) cut into shards of ``shard_tokens`` tokens
rounded down to a multiple of ``model_length``: chunk ``i`` is tokens ``[i L, (i + 1) L)`` of the split and never
spans two shards.  Only the tail of fewer than ``model_length`` tokens at the end of each split is dropped.  The
directory is written under a temporary name and renamed into place when complete; readers require ``index.json``
and check every shard's size against it, so a half-written directory is never used.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bd3lm.atomic import atomic_directory
from bd3lm.data import corpus
from bd3lm.tokenizer import ensure_mask_token, tokenizer_fingerprint

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerFast

__all__ = ["ShardOptions", "TokenChunks", "open_split", "prepare_shards", "read_index", "shard_dir_for"]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bumped whenever the content written for the same options changes; part of every cache key
INDEX = "index.json"
_DTYPES = {"uint16": "<u2", "uint32": "<u4"}


@dataclass(frozen=True)
class ShardOptions:
    """Everything that changes the tokens of a shard directory (all part of its cache key).  ``valid_docs`` overrides
    ``valid_fraction``; ``dtype``: ``auto`` (uint16 up to 65536 vocabulary entries, else uint32), uint16 or uint32."""

    model_length: int
    insert_eos: bool = True
    valid_fraction: float = 0.05
    valid_docs: int | None = None
    text_field: str = "text"
    dtype: str = "auto"

    @classmethod
    def of(cls, data_cfg, model_length: int) -> ShardOptions:
        """The options of a ``data`` config group (a mapping); keys absent from older configs take the defaults."""
        valid_docs = data_cfg.get("valid_docs")
        return cls(model_length=int(model_length), insert_eos=bool(data_cfg["insert_eos"]),
                   valid_fraction=float(data_cfg["valid_fraction"]),
                   valid_docs=None if valid_docs is None else int(valid_docs),
                   text_field=str(data_cfg["text_field"]), dtype=str(data_cfg.get("shard_dtype") or "auto"))

    def __post_init__(self) -> None:
        is_int = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low
        if not is_int(self.model_length, 1):
            raise ValueError(f"model_length must be an integer >= 1, got {self.model_length!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction!r}")
        if self.valid_docs is not None and not is_int(self.valid_docs, 0):
            raise ValueError(f"valid_docs must be null or an integer >= 0, got {self.valid_docs!r}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"shard dtype must be auto, uint16 or uint32, got {self.dtype!r}")


def _tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    ensure_mask_token(tokenizer)
    return hashlib.sha256(tokenizer_fingerprint(tokenizer).encode("utf-8")).hexdigest()


def shard_dir_for(path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, options: ShardOptions,
                  cache_dir: str | os.PathLike | None) -> Path:
    """Where :func:`prepare_shards` writes (``path`` itself when it is a prepared shard directory): named by a
    SHA-256 of the source identity (resolved path, size and mtime of every data file, or the hub name), the
    tokenizer fingerprint, every :class:`ShardOptions` field and the format version."""
    p = Path(os.path.expanduser(str(path)))
    if (p / INDEX).is_file():
        return p
    key = {"version": FORMAT_VERSION, "source": corpus.source_identity(str(path)),
           "tokenizer": _tokenizer_hash(tokenizer), "options": asdict(options)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", p.name.split(".")[0])[:40] or "corpus"
    return corpus.resolve_cache_dir(cache_dir) / f"{stem}-L{options.model_length}-{digest}"


def prepare_shards(path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, options: ShardOptions, *,
                   cache_dir: str | os.PathLike | None, num_proc: int | None = None,
                   shard_tokens: int = 1 << 28) -> Path:
    """Tokenise ``path`` (a corpus source of :mod:`bd3lm.data.corpus`, or a prepared shard directory, used as is once
    its options are checked) into its shard directory (:func:`shard_dir_for`) and return it; a cache hit does no
    work.  ``num_proc`` tokenisation processes (None: all CPUs, at most one per 256 documents).  The tokenizer
    gets a mask token if it has none; data containing the mask id is refused.  Every error is one line."""
    mask_id, eos_id = ensure_mask_token(tokenizer), tokenizer.eos_token_id
    if eos_id is None or (options.insert_eos and eos_id == mask_id):
        raise ValueError(f"tokenizer EOS id {eos_id} is missing or equal to the mask id {mask_id}")
    dtype = options.dtype if options.dtype != "auto" else "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    if dtype == "uint16" and len(tokenizer) > 1 << 16:
        raise ValueError(f"shard dtype uint16 cannot hold a vocabulary of {len(tokenizer)} tokens: use uint32 or auto")
    if not isinstance(shard_tokens, int) or shard_tokens < options.model_length:
        raise ValueError(f"shard_tokens must be an integer >= model_length={options.model_length}, got {shard_tokens}")
    out = shard_dir_for(path, tokenizer, options, cache_dir)
    if out == Path(os.path.expanduser(str(path))):  # a prepared directory: written with the requested settings?
        index = read_index(out)
        keys = ["model_length", "insert_eos", "valid_docs"] + ["valid_fraction"] * (options.valid_docs is None)
        have = {"tokenizer": index["tokenizer_sha256"][:16], **{k: index["options"][k] for k in keys}}
        want = {"tokenizer": _tokenizer_hash(tokenizer)[:16], **{k: getattr(options, k) for k in keys}}
        if options.dtype != "auto":
            have["dtype"], want["dtype"] = index["dtype"], options.dtype
        for key in have:
            if have[key] != want[key]:
                raise ValueError(f"shards in {out} were written with {key}={have[key]}; this run asks for {want[key]}")
        return out
    if (out / INDEX).is_file():
        logger.info("shard cache hit: %s", out)
        read_index(out)
        return out
    import datasets

    logger.info("shard cache miss: writing %s", out)
    bars = datasets.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # progress bars only on a terminal: a failing CLI prints one line
        datasets.disable_progress_bars()
    try:
        with atomic_directory(out, replace=out.exists()) as tmp:  # an existing target without index.json is junk
            _build(str(path), tokenizer, options, tmp, dtype, shard_tokens, num_proc, cache_dir)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return out


def _build(path: str, tokenizer: PreTrainedTokenizerFast, options: ShardOptions, tmp: Path, dtype: str,
           shard_tokens: int, num_proc: int | None, cache_dir: str | os.PathLike | None) -> None:
    import datasets

    field, length = options.text_field, options.model_length
    source = corpus.load_source(path, field, tmp / "_source")  # this build's own Arrow copy, deleted below
    texts = (t for batch in source.select_columns([field]).iter(batch_size=256) for t in batch[field])
    head = list(islice((t for t in texts if isinstance(t, str) and t.strip()), corpus.MIN_DOCS_FOR_DOC_SPLIT))
    if not head:
        raise ValueError(corpus._empty(path))
    small = options.valid_docs is None and len(head) < corpus.MIN_DOCS_FOR_DOC_SPLIT  # the tail rule: split here
    if small:
        train, valid = corpus.split_documents(head, options.valid_fraction)
        source = datasets.Dataset.from_dict({field: train + valid})
    tokens = _tokenise(source, field, tokenizer, dtype, num_proc, tmp / "_tokens")
    n_docs = len(tokens)
    n_train = len(train) if small else n_docs - corpus.n_valid_docs(n_docs, options.valid_fraction, options.valid_docs)
    lengths = tokens.data.column("n").to_numpy().astype(np.int64)
    bounds = {"train": (0, n_train), "valid": (n_train, n_docs)}
    totals = {s: int(lengths[a:b].sum()) + (b - a) * options.insert_eos for s, (a, b) in bounds.items()}
    if totals["train"] < length:
        raise ValueError(f"corpus too small: {totals['train']} training tokens < one chunk of model_length={length}")
    if totals["valid"] < length and (options.valid_fraction > 0 if options.valid_docs is None else options.valid_docs):
        raise ValueError(f"the validation split of {path} is empty: {totals['valid']} validation tokens < one chunk "
                         f"of model_length={length} (valid_fraction={options.valid_fraction}, "
                         f"valid_docs={options.valid_docs})")
    eos, per_shard, splits = tokenizer.eos_token_id if options.insert_eos else None, shard_tokens // length * length, {}
    for name, (a, b) in bounds.items():
        keep = totals[name] // length * length
        pieces = _packed(tokens, range(a, b), eos, dtype) if b > a else ()
        splits[name] = {"shards": _write_split(tmp, name, pieces, keep, per_shard, tokenizer.mask_token_id),
                        "num_chunks": keep // length, "documents": b - a, "tokens_dropped": totals[name] - keep}
    del tokens
    shutil.rmtree(tmp / "_tokens")  # datasets' temporary tokenised Arrow files
    del source
    shutil.rmtree(tmp / "_source", ignore_errors=True)  # the Arrow copy of a local corpus: as large as the corpus
    index = {"format_version": FORMAT_VERSION, "dtype": dtype, "model_length": length,
             "eos_id": tokenizer.eos_token_id, "mask_id": tokenizer.mask_token_id, "vocab_size": len(tokenizer),
             "tokenizer_sha256": _tokenizer_hash(tokenizer), "options": asdict(options),
             "source": corpus.source_identity(path), "splits": splits}
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _encode(batch: dict[str, list], tokenizer: PreTrainedTokenizerFast, field: str, dtype: str) -> dict[str, list]:
    texts = [t for t in batch[field] if isinstance(t, str) and t.strip()]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"ids": [np.asarray(x, dtype=dtype) for x in ids], "n": [len(x) for x in ids]}


def _tokenise(source: datasets.Dataset, field: str, tokenizer: PreTrainedTokenizerFast, dtype: str,
              num_proc: int | None, workdir: Path, pass_bytes: int = 256 << 20) -> datasets.Dataset:
    """Columns ``ids`` (token arrays) and ``n`` (their lengths), one row per non-empty document, in Arrow files.

    One ``map(num_proc)`` per ``pass_bytes`` of text: a worker maps its part of the source into memory and the
    pages it reads stay resident until it exits, so bounded passes keep every process's RSS bounded.
    """
    import datasets

    workdir.mkdir()
    # default: every CPU, but at least one map batch (256 documents) per process: forking costs about a second
    procs = max(1, min(num_proc or min(os.cpu_count() or 1, -(-len(source) // 256)), len(source)))
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype)), "n": datasets.Value("int64")})
    step = max(procs, len(source) * pass_bytes // max(1, source.data.nbytes))
    parts = []
    for i, lo in enumerate(range(0, len(source), step)):
        part = source.select(range(lo, min(lo + step, len(source))))
        parts.append(part.map(
            _encode, batched=True, batch_size=256, fn_kwargs={"tokenizer": tokenizer, "field": field, "dtype": dtype},
            remove_columns=source.column_names, features=features, desc="tokenising", num_proc=procs if procs > 1 else
            None, cache_file_name=str(workdir / f"tokens-{i:05d}.arrow"),
            new_fingerprint=hashlib.sha256(f"{workdir}/{i}".encode()).hexdigest()[:32]))  # no tokenizer hashing
    return datasets.concatenate_datasets(parts)


def _packed(tokens: datasets.Dataset, rows: range, eos_id: int | None, dtype: str) -> Iterator[np.ndarray]:
    """The packed stream ``doc_0 [EOS] doc_1 [EOS] ...`` of ``tokens[rows]`` in pieces (EOS only when ``eos_id``).

    Read with plain file reads of the Arrow streams, not through the dataset's memory map: mapped pages stay
    resident in this process as it reads on (about 1.3 GB for a 2 GB corpus), buffers read are freed per batch.
    """
    import pyarrow as pa

    start = 0
    for cache in tokens.cache_files:
        with pa.OSFile(cache["filename"]) as source:
            for batch in pa.ipc.open_stream(source):
                lo, hi = max(rows.start - start, 0), min(rows.stop - start, batch.num_rows)
                start += batch.num_rows
                if lo < hi:
                    part = batch.slice(lo, hi - lo)
                    flat = part.column("ids").flatten().to_numpy().astype(_DTYPES[dtype], copy=False)
                    yield flat if eos_id is None else np.insert(flat, np.cumsum(part.column("n").to_numpy()), eos_id)


def _write_split(out: Path, name: str, pieces: Iterable[np.ndarray], keep: int, per_shard: int,
                 mask_id: int) -> list[dict[str, object]]:
    """Write the first ``keep`` tokens of ``pieces`` as ``name-00000.bin``, ... of ``per_shard`` tokens each."""
    shards, written = [], 0
    for piece in pieces:
        if written == keep:
            break
        if (piece == mask_id).any():
            raise ValueError(f"{name} data contains the mask id {mask_id} (a literal mask token in the text?)")
        piece = piece[: keep - written]
        while piece.size:
            if not shards or shards[-1]["tokens"] == per_shard:
                shards.append({"file": f"{name}-{len(shards):05d}.bin", "tokens": 0})
            take = min(piece.size, per_shard - shards[-1]["tokens"])
            with open(out / shards[-1]["file"], "ab") as f:
                f.write(piece[:take].tobytes())
            piece, written, shards[-1]["tokens"] = piece[take:], written + take, shards[-1]["tokens"] + take
    return shards


def read_index(shard_dir: str | os.PathLike) -> dict:
    """The ``index.json`` of a finished shard directory, after checking every shard's size against it."""
    d = Path(shard_dir)
    delete = f"delete {d} and prepare the shards again"
    try:
        index = json.loads((d / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{d} has no readable {INDEX} ({type(e).__name__}): not a finished shard directory; "
                         f"{delete}") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d} has shard format {index.get('format_version')}, expected {FORMAT_VERSION}; {delete}")
    for shard in (shard for split in index["splits"].values() for shard in split["shards"]):
        f, size = d / shard["file"], shard["tokens"] * np.dtype(_DTYPES[index["dtype"]]).itemsize
        if (f.stat().st_size if f.is_file() else None) != size:
            raise ValueError(f"shard {f} is missing or not {size} bytes as {INDEX} says (an interrupted copy?); "
                             f"{delete}")
    return index


class TokenChunks(torch.utils.data.Dataset):
    """The chunks of one split, memory-mapped (never loaded whole): item ``i`` is a ``(model_length,)`` int64 copy
    of chunk ``i``.  Attributes ``model_length``, ``dtype`` (uint16/uint32), ``num_tokens``, ``shard_dir``,
    ``split``.  Pickling (loader workers) carries the file names only."""

    def __init__(self, shard_dir: str | os.PathLike, split: str) -> None:
        index = read_index(shard_dir)
        if split not in index["splits"]:
            raise ValueError(f"split must be one of {', '.join(index['splits'])}, got {split!r}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.model_length, self.dtype = int(index["model_length"]), str(index["dtype"])
        self._shards = [(s["file"], int(s["tokens"])) for s in index["splits"][split]["shards"]]
        self._starts = np.cumsum([0] + [n // self.model_length for _, n in self._shards]).tolist()
        self.num_tokens = self._starts[-1] * self.model_length

    @functools.cached_property
    def _maps(self) -> list[np.memmap]:
        return [np.memmap(self.shard_dir / f, dtype=_DTYPES[self.dtype], mode="r", shape=(n,)) for f, n in self._shards]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"chunk {i} out of range for the {len(self)} chunks of the {self.split} split")
        i %= len(self)
        s = bisect.bisect_right(self._starts, i) - 1
        off = (i - self._starts[s]) * self.model_length
        return torch.from_numpy(self._maps[s][off: off + self.model_length].astype(np.int64))

    def to_tensor(self) -> torch.Tensor:
        """All chunks as one ``(N, model_length)`` int64 tensor (for small splits, e.g. evaluation)."""
        return torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *self._maps])).view(-1, self.model_length)


open_split = TokenChunks  # open_split(shard_dir, "train" or "valid"): the chunks of a prepared shard directory
