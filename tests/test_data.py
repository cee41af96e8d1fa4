"""Tests for bd3lm.data: corpus format, reading, splitting, packing, caching."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import bd3lm.data as data_mod  # noqa: E402
from bd3lm.data import (  # noqa: E402
    DEFAULT_CORPUS,
    DOC_SEPARATOR,
    ChunkDataset,
    build_datasets,
    dataset_cache_path,
    default_corpus,
    pack,
    read_documents,
    split_documents,
    tokenize_documents,
)
from bd3lm.tokenizer import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return read_documents(DEFAULT_CORPUS)


@pytest.fixture(scope="module")
def small_tok(plays):
    return train_bpe_tokenizer(plays[:3], vocab_size=512)


@pytest.fixture
def small_corpus(plays, tmp_path) -> str:
    """Four plays' first 30k characters, in the corpus format, as a .txt.gz file."""
    path = tmp_path / "small.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(DOC_SEPARATOR.join(p[:30000].rsplit("\n", 1)[0] + "\n" for p in plays[3:7]))
    return str(path)


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_file():
    path = Path(default_corpus())
    assert path.is_absolute() and path.is_file()
    assert path.stat().st_size <= 2 * 1024 * 1024
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        raw = f.read()
    assert len(raw.encode("utf-8")) > 1_000_000
    docs = read_documents(str(path))
    assert len(docs) == 38
    assert DOC_SEPARATOR.join(docs) == raw  # format: exactly "\f\n" between documents, nothing lost
    titles = {d.split("\n", 1)[0] for d in docs}
    assert {"Hamlet", "Macbeth", "The Tempest", "Measure for Measure"} <= titles
    for d in docs:
        assert d.endswith("\n") and "\f" not in d and len(d) > 50_000
    hamlet = next(d for d in docs if d.startswith("Hamlet\n"))
    assert "HAMLET:\nTo be, or not to be" in hamlet
    assert not any(c in raw for c in "*_#\\")  # markdown markup removed


# ---------------------------------------------------------------- reading


def test_read_txt_formats(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("para one\n\npara two\n")
    assert read_documents(str(one)) == ["para one\n\npara two\n"]  # no separator line: one document
    multi = tmp_path / "multi.txt"
    multi.write_text("doc a\nline\n\f\ndoc b has a \f inside\n\f\r\n\f\n  \n\f\ndoc c")
    assert read_documents(str(multi)) == ["doc a\nline\n", "doc b has a \f inside\n", "doc c"]
    gz = tmp_path / "multi.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("x\n\f\ny\n")
    assert read_documents(str(gz)) == ["x\n", "y\n"]


def test_read_jsonl_and_parquet(tmp_path):
    rows = [
        {"text": "first doc", "body": "b1"},
        {"text": "   ", "body": "b2"},
        {"text": "third doc", "body": "b3"},
    ]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_documents(str(jl)) == ["first doc", "third doc"]
    assert read_documents(str(jl), text_field="body") == ["b1", "b2", "b3"]
    with pytest.raises(ValueError, match="no field 'nope'"):
        read_documents(str(jl), text_field="nope")
    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    assert read_documents(str(pq)) == ["first doc", "third doc"]


def test_read_errors(tmp_path):
    missing = tmp_path / "nothing_here.txt.gz"
    with pytest.raises(FileNotFoundError, match="nothing_here.txt.gz"):
        read_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="some-hub-dataset"):  # offline: no hub lookup
        read_documents("some-hub-dataset")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\f\n\t\n")
    with pytest.raises(ValueError, match="empty"):
        read_documents(str(empty))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_documents(str(bad))


# ---------------------------------------------------------------- splitting


def test_split_document_level_is_deterministic():
    docs = [f"document {i}\nbody\n" for i in range(40)]
    train, valid = split_documents(docs, valid_fraction=0.1, seed=3)
    assert len(valid) == 4 and len(train) == 36
    assert sorted(train + valid) == sorted(docs)
    assert (train, valid) == split_documents(docs, valid_fraction=0.1, seed=3)
    assert valid != split_documents(docs, valid_fraction=0.1, seed=4)[1]
    assert [d for d in docs if d in valid] == valid  # original order kept
    assert split_documents(docs, valid_docs=2, seed=0)[1].__len__() == 2
    assert split_documents(docs, valid_fraction=0.0) == (docs, [])


def test_split_few_documents_cuts_tails_at_lines():
    rng = random.Random(0)
    docs = ["".join(f"line {i} {'x' * rng.randint(0, 30)}\n" for i in range(200)) for _ in range(3)]
    train, valid = split_documents(docs, valid_fraction=0.1)
    assert len(train) == len(valid) == 3
    for d, t, v in zip(docs, train, valid, strict=True):
        assert t + v == d  # nothing lost or duplicated
        assert t.endswith("\n")  # cut at a line boundary
        assert 0.07 < len(v) / len(d) < 0.11
    assert split_documents(["no newline at all"], valid_fraction=0.2) == (["no newline at all"], [])
    with pytest.raises(ValueError):
        split_documents(docs, valid_fraction=1.0)


# ---------------------------------------------------------------- packing


def _random_docs(n: int, seed: int = 0) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randint(3, 99) for _ in range(g.randint(0, 40))] for _ in range(n)]


@pytest.mark.parametrize("insert_eos", [True, False])
@pytest.mark.parametrize("model_length", [1, 7, 16, 64])
def test_pack_wrap_no_drop_no_dup(insert_eos, model_length):
    docs = _random_docs(50)
    stream = [t for d in docs for t in (d + [1] if insert_eos else d)]
    chunks = pack(docs, model_length, eos_id=1, insert_eos=insert_eos)
    assert chunks.dtype == torch.long and chunks.shape[1] == model_length
    flat = chunks.flatten().tolist()
    tail = len(stream) - len(flat)
    assert 0 <= tail < model_length
    assert flat == stream[: len(flat)]
    assert chunks.shape[0] == len(stream) // model_length


def test_pack_chunk_special():
    docs = _random_docs(30, seed=1)
    stream = [t for d in docs for t in d + [1]]
    chunks = pack(docs, 10, eos_id=1, bos_id=2, chunk_special=True)
    assert (chunks[:, 0] == 2).all() and (chunks[:, -1] == 1).all()
    body = chunks[:, 1:-1].flatten().tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 8
    same_bos = pack(docs, 10, eos_id=1, chunk_special=True)
    assert (same_bos[:, 0] == 1).all()


def test_pack_too_small():
    with pytest.raises(ValueError, match=r"6 tokens.*model_length=8"):
        pack([[5, 6], [7, 8]], 8, eos_id=1)
    with pytest.raises(ValueError, match="model_length=8"):
        pack([[5] * 5], 8, eos_id=1, insert_eos=False, chunk_special=True)  # 5 tokens < 6 body
    assert pack([[5] * 5], 8, eos_id=1, chunk_special=True).shape == (1, 8)


# ---------------------------------------------------------------- build + cache


def test_build_content_matches_pipeline(small_corpus, small_tok, tmp_path):
    train, valid = build_datasets(
        small_corpus, small_tok, 32, cache_dir=str(tmp_path / "c"), valid_fraction=0.1
    )
    docs = read_documents(small_corpus)
    tr_docs, va_docs = split_documents(docs, 0.1, 0)
    eos = small_tok.eos_token_id
    assert torch.equal(train, pack(tokenize_documents(tr_docs, small_tok), 32, eos_id=eos))
    assert torch.equal(valid, pack(tokenize_documents(va_docs, small_tok), 32, eos_id=eos))
    assert small_tok.mask_token_id not in train and small_tok.mask_token_id not in valid
    assert (train == eos).sum() >= len(tr_docs) - 1  # one EOS per document (the last may be in the tail)
    ds = ChunkDataset(train)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.equal(batch["input_ids"], train[:4]) and batch["attention_mask"].sum() == 4 * 32
    assert torch.equal(ChunkDataset(train, as_dict=False)[3], train[3])


def test_cache_keys_and_hits(small_corpus, small_tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    base = dict(cache_dir=str(cache), insert_eos=True, chunk_special=False, valid_fraction=0.05, seed=0)
    variants = {
        "base": ({}, 32),
        "no_eos": ({"insert_eos": False}, 32),
        "special": ({"chunk_special": True}, 32),
        "length": ({}, 48),
        "fraction": ({"valid_fraction": 0.2}, 32),
    }
    results, files = {}, {}
    for name, (kw, length) in variants.items():
        opts = {**base, **kw}
        results[name] = build_datasets(small_corpus, small_tok, length, **opts)
        files[name] = dataset_cache_path(small_corpus, small_tok, length, **opts)
        assert files[name].is_file()
    assert len(set(files.values())) == len(variants)
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in files.values())  # no temp files
    b_train, b_valid = results["base"]
    assert not torch.equal(results["no_eos"][0], b_train)
    assert (results["special"][0][:, 0] == small_tok.bos_token_id).all()
    assert results["length"][0].shape[1] == 48
    assert results["fraction"][1].shape[0] > b_valid.shape[0]
    # only valid_fraction changed... yet with fewer than 20 docs every document loses its tail: train differs
    assert results["fraction"][0].shape[0] < b_train.shape[0]

    # Same options: cache hit -- the corpus is not read again and the file is not rewritten.
    mtime = files["base"].stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("corpus was re-read despite a cache hit")

    monkeypatch.setattr(data_mod, "read_documents", boom)
    again = build_datasets(small_corpus, small_tok, 32, **base)
    assert torch.equal(again[0], b_train) and torch.equal(again[1], b_valid)
    assert files["base"].stat().st_mtime_ns == mtime
    # A different seed or text_field is another key even when content happens to be equal.
    assert dataset_cache_path(small_corpus, small_tok, 32, **{**base, "seed": 1}) != files["base"]
    assert dataset_cache_path(small_corpus, small_tok, 32, **base, text_field="body") != files["base"]


def test_cache_keyed_by_corpus_and_tokenizer(small_corpus, small_tok, plays, tmp_path):
    key = dataset_cache_path(small_corpus, small_tok, 32, cache_dir=str(tmp_path))
    other_tok = train_bpe_tokenizer(plays[:1], vocab_size=400)
    assert dataset_cache_path(small_corpus, other_tok, 32, cache_dir=str(tmp_path)) != key
    with gzip.open(small_corpus, "at", encoding="utf-8") as f:
        f.write("\f\nA new document appended.\n")
    assert dataset_cache_path(small_corpus, small_tok, 32, cache_dir=str(tmp_path)) != key


def test_mask_never_in_data(small_tok, tmp_path):
    corpus = tmp_path / "masky.txt"
    corpus.write_text(
        ("Some text with a literal <|mask|> token inside.\n" * 40) + "\f\n" + "more text\n" * 40
    )
    with pytest.raises(ValueError, match="mask id"):
        build_datasets(str(corpus), small_tok, 16, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_build_errors(small_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        build_datasets(str(tmp_path / "absent.txt"), small_tok, 16, cache_dir=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        build_datasets(str(empty), small_tok, 16, cache_dir=str(tmp_path))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi.\n")
    with pytest.raises(ValueError, match="model_length=1024"):
        build_datasets(str(tiny), small_tok, 1024, cache_dir=str(tmp_path), valid_fraction=0.0)
