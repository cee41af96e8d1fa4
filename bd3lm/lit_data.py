"""Training data for the Lightning pipeline: tokenizer preparation, packed datasets and a resumable sampler.

The core data layer (:mod:`bd3lm.data`, :mod:`bd3lm.tokenizer`) reads, tokenises, packs and caches a corpus;
this module adds what a training run needs on top:

* :func:`prepare_tokenizer`: the run's tokenizer, saved in ``run_dir/tokenizer`` once a start succeeds (a
  resumed run reuses it).
  For ``tokenizer: bpe`` a byte-level BPE is trained on the *training split only* and cached by
  corpus/options.
* :class:`ResumableSampler`: an infinite stream of seeded per-epoch permutations, sharded across ranks. Its
  position is a single integer (micro-batches consumed), saved in the checkpoint, so a resumed run sees
  exactly the batches an uninterrupted run would have seen.
* :class:`ChunkDataModule`: train/validation loaders over packed ``(N, L)`` chunks; validation shards are
  equal across ranks (so collective ops in validation never deadlock).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from bd3lm.atomic import atomic_directory
from bd3lm.data import (
    ChunkDataset,
    build_datasets,
    dataset_cache_path,
    default_corpus,
    read_documents,
    split_documents,
)
from bd3lm.tokenizer import load_tokenizer, train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "ChunkDataModule",
    "ResumableSampler",
    "corpus_path",
    "local_rank_from_env",
    "prepare_datasets",
    "prepare_tokenizer",
    "save_run_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"


def local_rank_from_env() -> int:
    """The node-local rank of this process as set by Lightning / torchrun / SLURM (0 when not distributed)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _wait_for(path: Path, what: str, timeout: float = 3600.0) -> None:
    """Block a non-zero local rank until local rank 0 has written ``path``."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for local rank 0 to write {what} at {path}"
            )
        time.sleep(0.5)


def corpus_path(path: str | None) -> str:
    """The corpus to read: ``path`` or, when it is empty/None, the embedded Shakespeare corpus."""
    return default_corpus() if not path else os.path.expanduser(str(path))


def _file_identity(path: str) -> dict:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"name": path}


def _train_bpe_cached(
    path: str, vocab_size: int, valid_fraction: float, seed: int, text_field: str, cache_dir: Path
) -> Path:
    """Train (or reuse from ``cache_dir``) a BPE on the training split of ``path``; return its directory."""
    key = {
        "source": _file_identity(path),
        "vocab_size": int(vocab_size),
        "valid_fraction": float(valid_fraction),
        "seed": int(seed),
        "text_field": text_field,
        "version": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_dir / "tokenizers" / f"bpe{vocab_size}-{digest}"
    if (out / TOKENIZER_FILE).is_file():
        return out
    train_docs, _ = split_documents(read_documents(path, text_field), valid_fraction, seed)
    with atomic_directory(out, replace=False) as tmp:  # another process may win the race: identical content
        train_bpe_tokenizer(train_docs, vocab_size, save_dir=str(tmp))
    return out


def prepare_tokenizer(
    data_cfg,
    *,
    run_dir: Path,
    cache_dir: Path,
    seed: int,
    init_from: str | None = None,
) -> PreTrainedTokenizerFast:
    """Return the run's tokenizer.

    Precedence: an existing ``run_dir/tokenizer`` (resume) > the tokenizer saved next to ``init_from``
    (fine-tuning keeps the pretrained vocabulary) > ``data_cfg.tokenizer``: ``"bpe"`` (trained on the training
    split, vocabulary ``data_cfg.vocab_size`` including the mask, cached in ``cache_dir``), ``"gpt2"`` or a
    tokenizer directory. Nothing is written to ``run_dir`` here: :func:`save_run_tokenizer` does that once the
    whole start has succeeded (``train.commit_start``), so a failed start leaves no tokenizer that would win over
    the next one. Non-zero local ranks wait for local rank 0 to have saved ``run_dir/tokenizer``.
    """
    target = run_dir / "tokenizer"
    if (target / TOKENIZER_FILE).is_file():
        return load_tokenizer(str(target))
    if local_rank_from_env() != 0:
        _wait_for(target / TOKENIZER_FILE, "the tokenizer")
        return load_tokenizer(str(target))
    if init_from:
        p = Path(os.path.expanduser(init_from))
        for cand in (p, p.parent.parent / "tokenizer", p.parent / "tokenizer"):
            if cand.is_dir() and (cand / TOKENIZER_FILE).is_file():
                return load_tokenizer(str(cand))
    spec = str(data_cfg.tokenizer)
    if spec == "bpe":
        source = _train_bpe_cached(
            corpus_path(data_cfg.path),
            int(data_cfg.vocab_size),
            float(data_cfg.valid_fraction),
            seed,
            str(data_cfg.text_field),
            cache_dir,
        )
        return load_tokenizer(str(source))
    return load_tokenizer(spec)


def save_run_tokenizer(tokenizer: PreTrainedTokenizerFast, run_dir: Path) -> Path:
    """Save ``tokenizer`` as ``run_dir/tokenizer`` (atomically) unless it is already there."""
    target = run_dir / "tokenizer"
    if (target / TOKENIZER_FILE).is_file():
        return target
    with atomic_directory(target) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return target


def prepare_datasets(
    data_cfg, tokenizer: PreTrainedTokenizerFast, model_length: int, *, cache_dir: Path, seed: int
) -> tuple[Tensor, Tensor]:
    """Packed ``(train, valid)`` chunks of ``model_length`` tokens (cached; built by local rank 0)."""
    kw = dict(
        cache_dir=str(cache_dir),
        insert_eos=bool(data_cfg.insert_eos),
        chunk_special=False,
        valid_fraction=float(data_cfg.valid_fraction),
        seed=seed,
        text_field=str(data_cfg.text_field),
    )
    path = corpus_path(data_cfg.path)
    if local_rank_from_env() != 0:
        _wait_for(dataset_cache_path(path, tokenizer, model_length, **kw), "the packed dataset")
    train, valid = build_datasets(path, tokenizer, model_length, **kw)
    if valid.shape[0] == 0:
        raise ValueError(
            f"the validation split of {path} is empty (data.valid_fraction={data_cfg.valid_fraction})"
        )
    return train, valid


class ResumableSampler(Sampler[int]):
    """Infinite, rank-sharded stream of indices over ``n`` items: a seeded permutation per epoch.

    The global stream is ``perm_0 ++ perm_1 ++ ...`` with ``perm_e = randperm(n)`` seeded by ``(seed, e)``.
    Global micro-batch ``j`` is the stream slice ``[j G, (j + 1) G)`` with ``G = batch_size * world_size``;
    rank ``r`` takes the sub-slice ``[j G + r B, j G + (r + 1) B)``. Iteration starts at global batch
    ``start_batch``, so the data position is one integer. The sampler has no ``__len__`` (Lightning treats the
    loader as infinite and stops at ``max_steps``).
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        if n < 1:
            raise ValueError("the training split has no chunks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def _perm(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        b, g = self.batch_size, self.batch_size * self.world_size
        cached_epoch, perm = -1, None
        j = self.start_batch
        while True:
            start = j * g + self.rank * b
            for pos in range(start, start + b):
                epoch, off = divmod(pos, self.n)
                if epoch != cached_epoch:
                    cached_epoch, perm = epoch, self._perm(epoch)
                yield int(perm[off])
            j += 1


class ChunkDataModule(L.LightningDataModule):
    """Loaders over packed chunks; set :attr:`start_batch` (micro-batches consumed) before fit to resume.

    Args:
        train, valid: ``(N, L)`` long tensors.
        batch_size, eval_batch_size: per-device micro-batch sizes.
        seed: data-order seed (independent of the model/noise seeds).
        num_workers: loader workers (0 = in-process; packed chunks need no preprocessing).
    """

    def __init__(
        self,
        train: Tensor,
        valid: Tensor,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_chunks, self.valid_chunks = train, valid
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.start_batch = 0

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableSampler(
            len(self.train_chunks),
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start_batch=self.start_batch,
        )
        return DataLoader(
            ChunkDataset(self.train_chunks, as_dict=False),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            generator=torch.Generator(),
            persistent_workers=self.num_workers > 0,
        )

    def valid_shard(self, rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's validation chunks: equal strided shards (the remainder is dropped when world > 1)."""
        n = len(self.valid_chunks) // world_size * world_size
        if n == 0:
            raise ValueError(
                f"the validation split has {len(self.valid_chunks)} chunks, fewer than the "
                f"{world_size} processes"
            )
        return self.valid_chunks[rank:n:world_size]

    def val_dataloader(self) -> DataLoader:
        shard = self.valid_shard(*self._rank_world())
        return DataLoader(
            ChunkDataset(shard, as_dict=False),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=0,
            generator=torch.Generator(),
        )
