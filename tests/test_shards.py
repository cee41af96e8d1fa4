"""Tests for bd3lm.data.shards: token shards against a plain-Python oracle, the validation rule, cache keys,
atomicity, prepared directories, bad input and the evaluation reader."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from bd3lm.data import ShardOptions, open_split, prepare_shards, read_index, shard_dir_for  # noqa: E402
from bd3lm.data import corpus as corpus_mod  # noqa: E402
from bd3lm.data import shards as shards_mod  # noqa: E402
from bd3lm.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402

datasets.disable_progress_bars()

L = 16
WORDS = "the of and to a in that is was he for it with as his on by caf\u00e9 na\u00efve \u4e2d\u6587 :) 42".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` non-empty documents of random words and line breaks, each ending with a newline (as the plain-text
    format requires: a separator line starts after one)."""
    g = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(g.choices(WORDS, k=g.randint(1, 9))) for _ in range(g.randint(1, 6))]
        docs.append("\n".join(lines) + "\n")
    return docs


DOCS = make_docs(40)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(DOCS, vocab_size=300)


def oracle(docs: list[str], tokenizer, eos: bool = True) -> list[int]:
    """The documented stream: every document tokenised alone, EOS after each, cut to whole chunks."""
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    return stream[: len(stream) // L * L]


def tokens(shard_dir: Path, split: str) -> list[int]:
    return open_split(shard_dir, split).to_tensor().flatten().tolist()


def write_txt(path: Path, docs: list[str]) -> Path:
    assert all(d.endswith("\n") for d in docs[:-1])
    path.write_text("\f\n".join(docs), encoding="utf-8")
    return path


def prepare(path, tokenizer, tmp_path, num_proc=1, shard_tokens=3 * L + 5, **opts) -> Path:
    """Shards of 3 chunks: shard_tokens is rounded down to a multiple of L."""
    return prepare_shards(str(path), tokenizer, ShardOptions(L, **opts), cache_dir=tmp_path / "cache",
                          num_proc=num_proc, shard_tokens=shard_tokens)


def one_line(exc_info, *names) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


# ------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("fmt", ["txt", "jsonl_dir", "parquet"])
def test_shards_decode_to_the_documents(fmt, tok, tmp_path):
    docs = [d.rstrip("\n") if i % 3 == 0 and fmt != "txt" else d for i, d in enumerate(DOCS[:30])]
    source_docs = docs[:10] + ["  \t\n"] + docs[10:]  # whitespace-only documents are dropped
    if fmt == "txt":
        path = write_txt(tmp_path / "c.txt", source_docs)
    elif fmt == "jsonl_dir":  # several files, read in sorted path order whatever the creation order
        path = tmp_path / "dir"
        (path / "b").mkdir(parents=True)
        parts = {"b/z.jsonl": source_docs[20:], "a.jsonl": source_docs[:8], "b/m.jsonl": source_docs[8:20]}
        for name, part in parts.items():
            (path / name).write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(part)))
    else:
        path = tmp_path / "c.parquet"
        datasets.Dataset.from_dict({"text": source_docs}).to_parquet(str(path))
    out = prepare(path, tok, tmp_path, valid_docs=4)
    index = read_index(out)
    full_train = oracle(docs[:26], tok)
    assert tokens(out, "train") == full_train
    assert tokens(out, "valid") == oracle(docs[26:], tok)
    stream_len = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs[:26])
    train = index["splits"]["train"]
    assert train["documents"] == 26 and index["splits"]["valid"]["documents"] == 4
    assert train["tokens_dropped"] == stream_len - len(full_train) < L
    assert len(train["shards"]) >= 3 and all(s["tokens"] == 3 * L for s in train["shards"][:-1])
    # the on-disk format, read without TokenChunks: raw little-endian uint16, shards in name order
    raw = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in train["shards"]])
    assert index["dtype"] == "uint16" and raw.tolist() == oracle(docs[:26], tok)
    chunks = open_split(out, "train")
    assert len(chunks) == train["num_chunks"] == len(raw) // L and chunks.num_tokens == len(raw)
    for i in (0, 2, 3, len(chunks) - 1, -1):  # across shard boundaries (3 chunks per shard)
        assert chunks[i].dtype == torch.int64 and chunks[i].tolist() == raw[(i % len(chunks)) * L:][:L].tolist()
    with pytest.raises(IndexError):
        chunks[len(chunks)]


def test_no_eos_and_explicit_dtypes_give_the_same_tokens(tmp_path):
    gpt2 = load_tokenizer("gpt2")
    path = write_txt(tmp_path / "c.txt", DOCS)
    u16 = prepare(path, gpt2, tmp_path, dtype="uint16", insert_eos=False)
    u32 = prepare(path, gpt2, tmp_path, dtype="uint32", insert_eos=False)
    assert tokens(u16, "train") == tokens(u32, "train") == oracle(DOCS[:38], gpt2, eos=False)
    assert tokens(u16, "valid") == tokens(u32, "valid") == oracle(DOCS[38:], gpt2, eos=False)
    assert (u32 / "train-00000.bin").stat().st_size == 2 * (u16 / "train-00000.bin").stat().st_size == 4 * 3 * L
    assert read_index(prepare(path, gpt2, tmp_path))["dtype"] == "uint16"  # auto: 50258 <= 65536


def big_vocab_tokenizer(size: int = 70_000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids go beyond 65535 (the document words get the highest ids)."""
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(size - 2 - len(WORDS))}}
    for w in WORDS:
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")


def test_uint32_for_large_vocabularies(tmp_path):
    big = big_vocab_tokenizer()
    path = write_txt(tmp_path / "c.txt", DOCS)
    out = prepare(path, big, tmp_path)
    assert read_index(out)["dtype"] == "uint32" and read_index(out)["vocab_size"] == 70_001  # + mask
    assert tokens(out, "train") == oracle(DOCS[:38], big) and max(tokens(out, "train")) >= 1 << 16
    with pytest.raises(ValueError) as e:
        prepare(path, big, tmp_path, dtype="uint16")
    one_line(e, "uint16", "70001")


# ------------------------------------------------------------------------------------- the split rule


def test_validation_is_the_last_documents(tok, tmp_path):
    path = write_txt(tmp_path / "c.txt", DOCS)
    for opts, n_valid in (({"valid_fraction": 0.1}, 4), ({"valid_fraction": 0.01}, 1), ({"valid_docs": 7}, 7),
                          ({"valid_fraction": 0.3, "valid_docs": 2}, 2)):
        out = prepare(path, tok, tmp_path, **opts)
        assert tokens(out, "valid") == oracle(DOCS[40 - n_valid:], tok), opts
        assert tokens(out, "train") == oracle(DOCS[: 40 - n_valid], tok), opts
    out = prepare(path, tok, tmp_path, valid_fraction=0.0)
    assert len(open_split(out, "valid")) == 0 and open_split(out, "valid").to_tensor().shape == (0, L)
    assert tokens(out, "train") == oracle(DOCS, tok)


def test_small_corpus_tail_rule(tok, tmp_path):
    docs = ["".join(DOCS[i * 10: i * 10 + 10]).replace("\n\n", "\n") for i in range(3)]  # 3 long documents
    path = write_txt(tmp_path / "c.txt", docs)
    heads, tails = [], []
    for d in docs:  # the documented cut: after the first "\n" at or after ceil(len * (1 - f))
        cut = d.index("\n", math.ceil(len(d) * 0.8)) + 1
        heads.append(d[:cut])
        tails.append(d[cut:])
    out = prepare(path, tok, tmp_path, valid_fraction=0.2)
    assert tokens(out, "train") == oracle(heads, tok) and tokens(out, "valid") == oracle(tails, tok)
    out = prepare(path, tok, tmp_path, valid_docs=1)  # valid_docs: whole documents even for few documents
    assert tokens(out, "valid") == oracle(docs[2:], tok)


def test_num_proc_gives_identical_bytes(tok, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "c.txt", DOCS * 3)
    real, arrow_files = shards_mod._tokenise, []

    def spy(*a, **k):
        out = real(*a, **k)
        arrow_files.append(len(out.cache_files))
        return out

    monkeypatch.setattr(shards_mod, "_tokenise", spy)
    one = prepare_shards(str(path), tok, ShardOptions(L), cache_dir=tmp_path / "a", num_proc=1, shard_tokens=64)
    two = prepare_shards(str(path), tok, ShardOptions(L), cache_dir=tmp_path / "b", num_proc=2, shard_tokens=64)
    monkeypatch.setattr(shards_mod, "_tokenise", partial(spy, pass_bytes=300))  # many bounded map passes
    many = prepare_shards(str(path), tok, ShardOptions(L), cache_dir=tmp_path / "c", num_proc=1, shard_tokens=64)
    assert arrow_files[:2] == [1, 2] and arrow_files[2] > 3  # two processes, then several passes, really ran
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) == sorted(p.name for p in many.iterdir())
    assert len(names) > 3 and "_tokens" not in names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes() == (many / name).read_bytes(), name


# ------------------------------------------------------------------------------------- cache


def test_cache_hit_does_no_work_and_keys_differ(tok, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "c.txt", DOCS)
    out = prepare(path, tok, tmp_path)
    assert out.parent == tmp_path / "cache" and out.name.startswith("c-L16-")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*a, **k):
        raise AssertionError("the corpus was read again on a cache hit")

    monkeypatch.setattr(corpus_mod, "load_source", boom)
    monkeypatch.setattr(shards_mod, "_build", boom)
    assert prepare(path, tok, tmp_path) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    base = ShardOptions(L)
    variants = [ShardOptions(L + 1), ShardOptions(L, insert_eos=False), ShardOptions(L, valid_fraction=0.1),
                ShardOptions(L, valid_docs=3), ShardOptions(L, text_field="body"), ShardOptions(L, dtype="uint32")]
    dirs = {shard_dir_for(str(path), tok, o, tmp_path / "cache") for o in [base, *variants]}
    assert len(dirs) == 1 + len(variants) and out in dirs
    assert shard_dir_for(str(path), tok, ShardOptions(L), tmp_path / "cache") == out  # equal options, same dir
    other = train_bpe_tokenizer(DOCS[:20], vocab_size=290)
    assert shard_dir_for(str(path), other, base, tmp_path / "cache") != out
    write_txt(path, DOCS[::-1])
    assert shard_dir_for(str(path), tok, base, tmp_path / "cache") != out


# ------------------------------------------------------------------------------------- atomicity


def test_a_crash_mid_write_leaves_nothing(tok, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "c.txt", DOCS)
    real = shards_mod._write_split
    written = []

    def crash_after_train(out, name, *a, **k):
        if name == "valid":
            written.extend(p.name for p in out.iterdir())
            raise RuntimeError("simulated crash")
        return real(out, name, *a, **k)

    monkeypatch.setattr(shards_mod, "_write_split", crash_after_train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(path, tok, tmp_path)
    assert "train-00000.bin" in written  # the crash came after shards were written
    target = shard_dir_for(str(path), tok, ShardOptions(L), tmp_path / "cache")
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(shards_mod, "_write_split", real)
    # a directory left at the final name without index.json (e.g. kill -9 of an older writer) is never used
    target.mkdir()
    (target / "train-00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError) as e:
        open_split(target, "train")
    one_line(e, target, "index.json", "delete")
    assert prepare(path, tok, tmp_path) == target
    assert tokens(target, "train") == oracle(DOCS[:38], tok)


def test_a_truncated_shard_is_a_one_line_error(tok, tmp_path):
    out = prepare(write_txt(tmp_path / "c.txt", DOCS), tok, tmp_path)
    shard = out / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    for call in (lambda: open_split(out, "train"), lambda: prepare(tmp_path / "c.txt", tok, tmp_path)):
        with pytest.raises(ValueError) as e:
            call()
        one_line(e, shard, "delete")


# ------------------------------------------------------------------------------------- prepared directories


def test_a_prepared_directory_is_used_as_is(tok, tmp_path, monkeypatch):
    out = prepare(write_txt(tmp_path / "c.txt", DOCS), tok, tmp_path, valid_docs=3)
    monkeypatch.setattr(shards_mod, "_build", lambda *a, **k: pytest.fail("rebuilt a prepared directory"))
    assert prepare(out, tok, tmp_path, valid_docs=3, valid_fraction=0.3) == out  # valid_docs overrides
    assert shard_dir_for(str(out), tok, ShardOptions(L, valid_docs=3), None) == out
    with pytest.raises(ValueError) as e:
        prepare_shards(str(out), tok, ShardOptions(2 * L, valid_docs=3), cache_dir=tmp_path)
    assert str(e.value) == f"shards in {out} were written with model_length={L}; this run asks for {2 * L}"
    for opts, key in (({"insert_eos": False}, "insert_eos"), ({"valid_docs": 4}, "valid_docs"),
                      ({"valid_docs": 3, "dtype": "uint32"}, "dtype")):
        with pytest.raises(ValueError) as e:
            prepare(out, tok, tmp_path, **opts)
        one_line(e, out, f"{key}=")
    with pytest.raises(ValueError) as e:
        prepare(out, train_bpe_tokenizer(DOCS[:20], vocab_size=290), tmp_path, valid_docs=3)
    one_line(e, out, "tokenizer=")


# ------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line(tok, tmp_path):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.md").write_text("no data here")
    blank = write_txt(tmp_path / "blank.txt", ["  \n", "\t\n"])
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "hello"}\n')
    tiny = write_txt(tmp_path / "tiny.txt", ["hi"])
    short_tail = write_txt(tmp_path / "short_tail.txt", DOCS[:25] + ["a"])
    masky = write_txt(tmp_path / "masky.txt", DOCS[:25] + ["a literal <|mask|> token\n"] + DOCS[25:])
    cases = [
        (nothing, {}, ValueError, [nothing, "no readable documents"]),
        (blank, {}, ValueError, [blank, "is empty"]),
        (csv, {}, ValueError, ["x.csv", "unsupported"]),
        (jl, {}, ValueError, ["'text'", "body"]),
        (tiny, {"valid_fraction": 0.0}, ValueError, ["corpus too small", "training tokens", "model_length=16"]),
        (short_tail, {"valid_docs": 1}, ValueError, [short_tail, "validation", "model_length=16"]),
        (write_txt(tmp_path / "ok.txt", DOCS), {"valid_docs": 40}, ValueError, ["40 of 40"]),
        (masky, {}, ValueError, ["mask id", str(tok.mask_token_id)]),
        (tmp_path / "absent.txt", {}, FileNotFoundError, ["absent.txt"]),
        ("openwebtext", {}, FileNotFoundError, ["'openwebtext'", "not in the local Hugging Face cache"]),
    ]
    for path, opts, exc, names in cases:
        with pytest.raises(exc) as e:
            prepare(path, tok, tmp_path, **opts)
        one_line(e, *names)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "hf_datasets"]  # nothing half-written
    for bad in ({"model_length": 0}, {"valid_fraction": 1.0}, {"valid_docs": -2}, {"dtype": "int8"}):
        with pytest.raises(ValueError) as e:
            ShardOptions(**{"model_length": L, **bad})
        one_line(e, next(iter(bad.values())))


def test_utf8_error_through_shards(tok, tmp_path):
    gz = tmp_path / "latin1.txt.gz"
    gz.write_bytes(gzip.compress("ok\n\f\ncaf\u00e9\n".encode("latin-1")))
    with pytest.raises(ValueError) as e:
        prepare(gz, tok, tmp_path)
    assert str(e.value).startswith(f"corpus {gz} is not UTF-8 text: invalid byte 0xe9 at offset 8 (after "
                                   "decompression), line 3")


# ------------------------------------------------------------------------------------- readers


def test_token_chunks_pickle_light_and_load(tok, tmp_path):
    out = prepare(write_txt(tmp_path / "c.txt", DOCS * 5), tok, tmp_path)
    chunks = open_split(out, "train")
    assert len(pickle.dumps(chunks)) < 4096  # loader workers get paths, not data
    batch = next(iter(torch.utils.data.DataLoader(chunks, batch_size=4)))
    assert torch.equal(batch, chunks.to_tensor()[:4]) and chunks.model_length == L and chunks.dtype == "uint16"


def test_validation_chunks_of_a_run(tok, tmp_path):
    from omegaconf import OmegaConf

    from bd3lm.evaluation import validation_chunks

    path = write_txt(tmp_path / "c.txt", DOCS)
    old = OmegaConf.create({"seed": 3, "model": {"length": L}, "data": {
        "path": str(path), "cache_dir": str(tmp_path / "cache"), "insert_eos": True, "valid_fraction": 0.1,
        "text_field": "text"}})  # an old config: no valid_docs / shard_dtype / num_proc
    expected = oracle(DOCS[36:], tok)
    assert validation_chunks(old, tok).flatten().tolist() == expected
    new = OmegaConf.merge(old, {"data": {"valid_docs": 2, "shard_dtype": "uint32", "num_proc": 1}})
    assert validation_chunks(new, tok).flatten().tolist() == oracle(DOCS[38:], tok)
    train_side = prepare_shards(str(path), tok, ShardOptions(L, valid_fraction=0.1), cache_dir=tmp_path / "cache")
    assert open_split(train_side, "valid").to_tensor().flatten().tolist() == expected
