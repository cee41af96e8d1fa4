"""Training data for the Lightning pipeline: the run's tokenizer, the token shards and a resumable loader.

* :func:`prepare_tokenizer`: the run's tokenizer, saved in ``run_dir/tokenizer`` once a start succeeds (a resumed
  run reuses it). For ``tokenizer: bpe`` a byte-level BPE is trained on the *training split only*, cached.
* :func:`prepare_data`: the memory-mapped token shards of the training and validation splits
  (:mod:`bd3lm.data`), written once by local rank 0.
* :class:`ChunkDataModule`: the loaders; the training position is a torchdata ``StatefulDataLoader`` state.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from bd3lm.atomic import atomic_directory
from bd3lm.data import default_corpus, read_split, source_identity
from bd3lm.tokenizer import load_tokenizer, train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["ChunkDataModule", "EndlessSampler", "corpus_path", "local_rank_from_env", "prepare_data",
           "prepare_tokenizer", "save_run_tokenizer"]

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
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for local rank 0 to write {what} at {path}")
        time.sleep(0.5)


def corpus_path(path: str | None) -> str:
    """The corpus to read: ``path`` or, when it is empty/None, the embedded Shakespeare corpus."""
    return default_corpus() if not path else os.path.expanduser(str(path))


def _train_bpe_cached(data_cfg, cache_dir: Path) -> Path:
    """Train (or reuse from ``cache_dir``) a BPE on the training split of the corpus; return its directory."""
    path, vocab_size = corpus_path(data_cfg.path), int(data_cfg.vocab_size)
    key = {"source": source_identity(path), "vocab_size": vocab_size, "valid_fraction": float(data_cfg.valid_fraction),
           "valid_docs": data_cfg.get("valid_docs"), "text_field": str(data_cfg.text_field), "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_dir / "tokenizers" / f"bpe{vocab_size}-{digest}"
    if not (out / TOKENIZER_FILE).is_file():
        train_docs, _ = read_split(path, key["text_field"], key["valid_fraction"], key["valid_docs"])
        with atomic_directory(out, replace=False) as tmp:  # another process may win the race: identical content
            train_bpe_tokenizer(train_docs, vocab_size, save_dir=str(tmp))
    return out


def prepare_tokenizer(data_cfg, *, run_dir: Path, cache_dir: Path, init_from: str | None = None
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
    if local_rank_from_env() != 0:
        _wait_for(target / TOKENIZER_FILE, "the tokenizer")
    if (target / TOKENIZER_FILE).is_file():
        return load_tokenizer(str(target))
    if init_from:
        p = Path(os.path.expanduser(init_from))
        for cand in (p, p.parent.parent / "tokenizer", p.parent / "tokenizer"):
            if (cand / TOKENIZER_FILE).is_file():
                return load_tokenizer(str(cand))
    spec = str(data_cfg.tokenizer)
    return load_tokenizer(str(_train_bpe_cached(data_cfg, cache_dir)) if spec == "bpe" else spec)


def save_run_tokenizer(tokenizer: PreTrainedTokenizerFast, run_dir: Path) -> Path:
    """Save ``tokenizer`` as ``run_dir/tokenizer`` (atomically) unless it is already there."""
    target = run_dir / "tokenizer"
    if not (target / TOKENIZER_FILE).is_file():
        with atomic_directory(target) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return target


def prepare_data(data_cfg, tokenizer: PreTrainedTokenizerFast, model_length: int, *, cache_dir: Path):
    """``(train, valid)`` memory-mapped chunk datasets of ``model_length`` tokens (:mod:`bd3lm.data.shards`).

    Local rank 0 tokenises into the shard cache (or finds it there); the other local ranks wait for its index.
    """
    from bd3lm.data import ShardOptions, open_split, prepare_shards, shard_dir_for

    options = ShardOptions.of(data_cfg, model_length)
    path = corpus_path(data_cfg.path)
    if local_rank_from_env() == 0:
        shards = prepare_shards(path, tokenizer, options, cache_dir=cache_dir, num_proc=data_cfg.get("num_proc"))
    else:
        shards = shard_dir_for(path, tokenizer, options, cache_dir)
        _wait_for(shards / "index.json", "the token shards")
    return open_split(shards, "train"), open_split(shards, "valid")


class EndlessSampler(Sampler[int]):
    """torch's ``DistributedSampler`` epoch after epoch (``set_epoch(0)``, ``set_epoch(1)``, ...), without end.

    Hand-written because training is counted in steps, not epochs: Lightning treats a loader without ``__len__``
    as one endless epoch, and this keeps every epoch boundary out of its loop (and out of the resume state).
    Each epoch is a permutation seeded by ``(seed, epoch)``; rank ``r`` of ``world_size`` takes every
    ``world_size``-th index of it, so the ranks read disjoint chunks.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < world_size:
            raise ValueError(f"the training split has {n} chunks, fewer than the {world_size} processes")
        self.epochs = DistributedSampler(range(n), world_size, rank, shuffle=True, seed=seed, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        for epoch in itertools.count():
            self.epochs.set_epoch(epoch)
            yield from self.epochs


class _Positioned:
    """The training loader, remembering its state after each of the last few batches handed out.

    Lightning fetches one batch ahead of the step it trains (to see the end of an epoch coming), so when a
    checkpoint is written the loader's own state is already past the batch being trained. :meth:`state_at`
    returns the state after exactly ``consumed`` batches, the position a resumed run must continue from.
    """

    def __init__(self, loader: StatefulDataLoader, consumed: int, state: dict | None) -> None:
        self.loader, self.start = loader, consumed
        self.states: dict[int, dict | None] = {consumed: state}

    def __iter__(self) -> Iterator[Tensor]:
        n = self.start
        for batch in self.loader:
            n += 1
            self.states[n] = self.loader.state_dict()
            self.states.pop(n - 8, None)
            yield batch

    def state_at(self, consumed: int) -> dict | None:
        if consumed not in self.states:
            raise RuntimeError(f"the data position after {consumed} batches is no longer known")
        return self.states[consumed]


class ChunkDataModule(L.LightningDataModule):
    """Training and validation loaders over chunk datasets (``(L,)`` token rows: shards, or an ``(N, L)`` tensor).

    Training: a torchdata ``StatefulDataLoader`` over :class:`EndlessSampler`; its state at the trained position
    is this module's ``state_dict`` (Lightning stores it in every checkpoint), so a resumed run continues with the
    very next batch. Validation: rank ``r`` of ``W`` takes chunks ``r, r + W, ...`` of the first ``N // W * W``,
    equal shards so collective ops never wait on a rank with fewer batches.

    ``train``/``valid``: map-style datasets of chunks; ``batch_size``/``eval_batch_size``: per-device micro-batch
    sizes; ``seed``: the data-order seed (independent of the model/noise seeds); ``num_workers``: loader workers
    (0 = in-process; memory-mapped chunks need no preprocessing).
    """

    def __init__(self, train, valid, *, batch_size: int, eval_batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.train_chunks, self.valid_chunks = train, valid
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.seed, self.num_workers = int(seed), int(num_workers)
        self._restored: tuple[int, dict | None] = (0, None)
        self._train: _Positioned | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> _Positioned:
        rank, world = self._rank_world()
        sampler = EndlessSampler(len(self.train_chunks), seed=self.seed, rank=rank, world_size=world)
        loader = StatefulDataLoader(self.train_chunks, batch_size=self.batch_size, sampler=sampler,
                                    num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        consumed, state = self._restored
        if state is not None:
            loader.load_state_dict(state)
        self._train = _Positioned(loader, consumed, state)
        return self._train

    def state_dict(self) -> dict:
        """``{"consumed": micro-batches trained on, "loader": the loader's state there}``."""
        if self._train is None or self.trainer is None:
            return {}
        consumed = int(self.trainer.lightning_module.batches_seen)
        return {"consumed": consumed, "loader": self._train.state_at(consumed)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._restored = (int(state["consumed"]), state["loader"])

    def valid_shard(self, rank: int = 0, world_size: int = 1) -> Subset:
        """This rank's validation chunks (equal strided shards; the remainder is dropped when world > 1)."""
        n = len(self.valid_chunks) // world_size * world_size
        if n == 0:
            raise ValueError(f"the validation split has {len(self.valid_chunks)} chunks, fewer than the {world_size} "
                             "processes")
        return Subset(self.valid_chunks, range(rank, n, world_size))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.valid_shard(*self._rank_world()), batch_size=self.eval_batch_size, shuffle=False)
