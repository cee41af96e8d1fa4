"""What an evaluation reads: a checkpoint with its tokenizer, and text packed into chunks of ``model_length``.

- :func:`load_checkpoint`: a ``save_pretrained`` directory (model + the tokenizer the training run saved there).
- :func:`validation_chunks`: the validation split of a training run, exactly as the run packed it (the same token
  shards: same corpus, split rule, EOS insertion and cache directory).
- :func:`chunks_from_file`: any local ``.txt``/``.txt.gz``/``.jsonl``/``.parquet`` file or directory (zero-shot
  evaluation), wrap-packed like the training data: every document followed by EOS when ``insert_eos`` (the official
  data pipeline's ``insert_valid_eos``), the tail shorter than one chunk dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bd3lm.checkpoint import check_checkpoint_dir
from bd3lm.data import (
    ShardOptions,
    default_corpus,
    open_split,
    pack,
    prepare_shards,
    read_documents,
    resolve_cache_dir,
)

__all__ = ["chunks_from_file", "load_checkpoint", "validation_chunks"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a checkpoint directory; one-line errors for a missing directory or tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bd3lm.model import BD3LM

    hf_logging.disable_progress_bar()

    path = os.fspath(path)
    check_checkpoint_dir(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"checkpoint {path!r} has no tokenizer (tokenizer.json): evaluation needs the tokenizer the model was "
            "trained with (train.py saves it in run_dir/hf)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a one-line user error
        raise FileNotFoundError(f"could not load the tokenizer of {path!r}: {' '.join(str(exc).split())}") from None
    model = BD3LM.from_pretrained(path).to(device).eval()
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"tokenizer of {path!r} has {len(tok)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    return model, tok


def validation_chunks(train_cfg, tokenizer) -> torch.Tensor:
    """The validation chunks of the run whose resolved ``config.yaml`` is ``train_cfg`` (an OmegaConf node): the
    ``valid`` split of the run's token shards (prepared again if the cache was removed). ``data.valid_docs``,
    ``data.shard_dtype`` and ``data.num_proc`` may be absent (older runs): the defaults then apply."""
    data = train_cfg.data
    path = os.path.expanduser(str(data.path)) if data.path else default_corpus()  # as train.py reads it
    options = ShardOptions.of(data, int(train_cfg.model.length))
    num_proc = data.get("num_proc")
    shards = prepare_shards(path, tokenizer, options, cache_dir=resolve_cache_dir(data.cache_dir),
                            num_proc=None if num_proc is None else int(num_proc))
    valid = open_split(shards, "valid")
    if len(valid) == 0:
        raise ValueError(f"the validation split of {path} is empty (data.valid_fraction={data.valid_fraction}, "
                         f"data.valid_docs={options.valid_docs})")
    return valid.to_tensor()


def chunks_from_file(
    path: str | os.PathLike,
    tokenizer,
    model_length: int,
    *,
    insert_eos: bool = True,
    chunk_special: bool = False,
    text_field: str = "text",
) -> torch.Tensor:
    """Pack every document of ``path`` into ``(N, model_length)`` chunks; a corpus shorter than one chunk is an
    error naming its token count. ``chunk_special``: every chunk is ``[BOS] body [EOS]`` (the official zero-shot
    packing, where position 0 is the BOS that ``ignore_first`` then leaves out)."""
    path = os.fspath(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"dataset {path!r} does not exist (a local .txt/.txt.gz/.jsonl/.parquet file or a "
                                "directory of them)")
    docs = read_documents(path, text_field)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None and (insert_eos or chunk_special):
        raise ValueError("the tokenizer has no EOS token to insert (set insert_eos=false chunk_special=false)")
    try:
        return pack(ids, model_length, eos_id=tokenizer.eos_token_id, bos_id=tokenizer.bos_token_id,
                    insert_eos=insert_eos, chunk_special=chunk_special)
    except ValueError as exc:
        raise ValueError(f"dataset {path!r}: {exc}") from None
