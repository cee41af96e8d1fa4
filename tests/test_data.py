"""Tests for bd3lm.data.corpus: corpus format, reading, the validation split rule, in-memory packing (the token
shards are tested in test_shards.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bd3lm.data import (  # noqa: E402
    DOC_SEPARATOR,
    default_corpus,
    pack,
    read_documents,
    read_split,
    split_documents,
)

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
    edges = tmp_path / "edges.txt"  # separator as the first and the last line (no newline), CRLF text kept
    edges.write_bytes("\f\nfirst\r\n\f\r\n\fnot a separator\n\f \nsecond caf\u00e9\n\f".encode())
    assert read_documents(str(edges)) == ["first\r\n", "\fnot a separator\n\f \nsecond caf\u00e9\n"]


def test_read_directory_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {"b.jsonl": ["b1", "b2"], "a.jsonl": ["a1"], "sub/c.jsonl": ["c1"], ".hidden.jsonl": ["h"]}
    for name, texts in files.items():
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "README.md").write_text("not data")
    assert read_documents(str(tmp_path)) == ["a1", "b1", "b2", "c1"]
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "2.txt").write_text("two\n\f\nthree\n")
    (texts / "1.txt").write_text("one\n")
    assert read_documents(str(texts)) == ["one\n", "two\n", "three\n"]
    (texts / "3.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="mixes corpus file kinds") as e:
        read_documents(str(texts))
    assert "\n" not in str(e.value) and str(texts) in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_utf8_error_names_file_offset_and_line(tmp_path, gz):
    raw = "ok line\n\f\nsecond doc caf\u00e9\n".encode("latin-1")
    path = tmp_path / ("bad.txt.gz" if gz else "bad.txt")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError) as e:
        read_documents(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "0xe9 at offset 24" in msg and "line 3" in msg
    assert ("after decompression" in msg) == gz


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
    with pytest.raises(FileNotFoundError) as e:  # offline: only the local HF cache is looked at
        read_documents("some-hub-dataset")
    assert str(e.value) == (
        "dataset 'some-hub-dataset' is not in the local Hugging Face cache and hub access is disabled "
        "(HF_DATASETS_OFFLINE): pass data.path=DIR of jsonl/parquet files")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\f\n\t\n")
    with pytest.raises(ValueError, match="empty"):
        read_documents(str(empty))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_documents(str(bad))


# ---------------------------------------------------------------- splitting


def test_split_holds_out_the_last_documents():
    docs = [f"document {i}\nbody\n" for i in range(40)]
    assert split_documents(docs, valid_fraction=0.1) == (docs[:36], docs[36:])  # round(0.1 * 40) = 4
    assert split_documents(docs, valid_fraction=0.1, seed=7) == (docs[:36], docs[36:])  # the seed plays no part
    assert split_documents(docs, valid_fraction=0.01) == (docs[:39], docs[39:])  # round(0.4) = 0 -> at least 1
    assert split_documents(docs, valid_fraction=0.0) == (docs, [])
    assert split_documents(docs, valid_fraction=0.5, valid_docs=3) == (docs[:37], docs[37:])  # overrides
    assert split_documents(docs[:5], valid_docs=2) == (docs[:3], docs[3:5])  # whole documents even when few
    assert split_documents(docs[:20], valid_fraction=0.05) == (docs[:19], docs[19:20])  # 20 = document split
    for bad in ({"valid_docs": 40}, {"valid_docs": -1}, {"valid_fraction": 1.0}):
        with pytest.raises(ValueError) as e:
            split_documents(docs, **bad)
        assert "\n" not in str(e.value) and str(next(iter(bad.values()))) in str(e.value)


def test_read_split_applies_the_rule_to_the_file(tmp_path):
    docs = [f"doc {i}\n" for i in range(30)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert read_split(str(path), "body", 0.1) == (docs[:27], docs[27:])
    assert read_split(str(path), "body", 0.1, valid_docs=5) == (docs[:25], docs[25:])


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
