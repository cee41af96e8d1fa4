"""Tests for bd3lm.tokenizer: BPE training on the embedded corpus, offline GPT-2, special tokens."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import time  # noqa: E402

import pytest  # noqa: E402

from bd3lm.data import DEFAULT_CORPUS, read_documents, split_documents  # noqa: E402
from bd3lm.tokenizer import (  # noqa: E402
    MASK_TOKEN,
    ensure_mask_token,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def corpus_split() -> tuple[list[str], list[str]]:
    return split_documents(read_documents(DEFAULT_CORPUS), valid_fraction=0.05, seed=0)


@pytest.fixture(scope="module")
def trained(corpus_split):
    train, _ = corpus_split
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(train, vocab_size=4096)
    return tok, time.perf_counter() - t0


def test_train_on_embedded_corpus_is_fast_and_sized(trained):
    tok, seconds = trained
    assert seconds < 20, f"BPE training took {seconds:.1f}s"
    assert len(tok) == 4096


def test_trained_special_tokens(trained):
    tok, _ = trained
    assert tok.mask_token == MASK_TOKEN
    assert tok.mask_token_id == len(tok) - 1 == 4095
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.mask_token_id
    assert tok.bos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert ensure_mask_token(tok) == 4095 and len(tok) == 4096  # idempotent: no second mask added


def test_round_trip_on_held_out_text(trained, corpus_split):
    tok, _ = trained
    _, valid = corpus_split
    held_out = [line for doc in valid for line in doc.split("\n") if line][:2000]
    assert len(held_out) == 2000
    text = "\n".join(held_out) + "\n  Odd   spacing, tabs\t, unicode: café — ½ 𝄞 \r\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned: well below one token per character
    assert tok.mask_token_id not in ids
    for line in held_out[:200]:
        assert tok.decode(tok(line, add_special_tokens=False)["input_ids"]) == line


def test_save_load_round_trip(trained, corpus_split, tmp_path):
    tok, _ = trained
    _, valid = corpus_split
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    sample = valid[0][:20000]
    assert (
        loaded(sample, add_special_tokens=False)["input_ids"]
        == tok(sample, add_special_tokens=False)["input_ids"]
    )
    assert len(loaded) == len(tok)
    assert (loaded.mask_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tok.mask_token_id,
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_train_with_save_dir(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog\n"] * 50
    tok = train_bpe_tokenizer(texts, vocab_size=300, save_dir=str(tmp_path / "tok"))
    assert tok.mask_token_id == len(tok) - 1
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded("lazy dog")["input_ids"] == tok("lazy dog")["input_ids"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_gpt2_offline():
    tok = load_tokenizer("gpt2")
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok(" the", add_special_tokens=False)["input_ids"] == [262]
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert tok.mask_token_id == 50257
    assert len(tok) == 50258
    assert tok.pad_token_id == 50256 != tok.mask_token_id
    text = "Hello world, it's 2024!  Ünïcödé\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _bare_tokenizer(**special: str):
    """A tiny fast tokenizer built directly with `tokenizers`, without a mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "<m>": 4}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", **special)


def test_ensure_mask_adds_missing_as_last_id():
    tok = _bare_tokenizer()
    assert tok.mask_token is None
    n = len(tok)
    mask_id = ensure_mask_token(tok)
    assert mask_id == n == len(tok) - 1
    assert tok.convert_ids_to_tokens(mask_id) == MASK_TOKEN
    assert ensure_mask_token(tok) == mask_id and len(tok) == n + 1  # idempotent


def test_ensure_mask_keeps_existing():
    tok = _bare_tokenizer(mask_token="<m>")
    n = len(tok)
    assert ensure_mask_token(tok) == 4
    assert len(tok) == n and tok.mask_token == "<m>"
    gpt2 = load_tokenizer("gpt2")
    assert ensure_mask_token(gpt2) == 50257 and len(gpt2) == 50258


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer("definitely-not-a-tokenizer")
    with pytest.raises(ValueError, match="no loadable tokenizer"):
        load_tokenizer(str(tmp_path))
