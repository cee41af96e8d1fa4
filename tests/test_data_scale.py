"""The synthetic OpenWebText-like corpus of eval.data_scale (eval/data_scale_corpus.py): format, size,
determinism and document lengths. No tokenisation, no training (those are what the benchmark measures)."""

import json
import math

import pytest

from eval.data_scale_corpus import MANIFEST, document_lengths, write_corpus

SIZE = 2_000_000  # bytes of text
MEAN = 1000.0  # mean document length (bytes): ~2000 documents, enough for the statistical check
SIGMA = 1.0
SETTINGS = dict(mean_doc_bytes=MEAN, sigma=SIGMA, file_bytes=700_000)  # three files


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three corpora: seed 0 twice (in two directories) and seed 1."""
    root = tmp_path_factory.mktemp("data_scale")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out[name] = (root / name, write_corpus(root / name, SIZE, seed=seed, **SETTINGS))
    return out


def test_files_are_jsonl_with_a_text_field_and_hold_the_requested_size(corpora):
    path, manifest = corpora["a"]
    files = sorted(path.glob("part-*.jsonl"))
    assert [f.name for f in files] == [f"part-{i:05d}.jsonl" for i in range(3)]
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST] + [f.name for f in files])  # no leftovers
    text_bytes = docs = 0
    for f in files:
        raw = f.read_bytes()
        assert raw.endswith(b"\n")
        for line in raw.decode("utf-8").splitlines():
            record = json.loads(line)
            assert list(record) == ["text"] and isinstance(record["text"], str) and record["text"].strip()
            text_bytes += len(record["text"].encode("utf-8"))
            docs += 1
    assert text_bytes >= SIZE and sum(f.stat().st_size for f in files) >= SIZE
    assert text_bytes < SIZE + 3 * 10 * MEAN  # each file stops within a few documents of its share
    assert (manifest["text_bytes"], manifest["docs"]) == (text_bytes, docs)
    assert manifest["file_bytes"] == sum(f.stat().st_size for f in files)
    assert not manifest["reused"]
    all_text = "".join(json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8"))
    assert any(c.isdigit() for c in all_text) and any(ord(c) > 127 for c in all_text)  # the mixed-in variety
    assert "\n\n" in all_text and '"' in all_text and "\\" in all_text  # paragraphs; characters JSON escapes


def test_same_seed_gives_identical_bytes_and_another_seed_differs(corpora):
    (a, _), (b, _), (c, _) = corpora["a"], corpora["b"], corpora["c"]
    names = sorted(p.name for p in a.glob("part-*.jsonl"))
    assert names == sorted(p.name for p in b.glob("part-*.jsonl"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / names[0]).read_bytes()[:10_000] != (c / names[0]).read_bytes()[:10_000]


def test_an_existing_corpus_is_reused_only_with_the_same_settings(corpora, tmp_path):
    path, manifest = corpora["a"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.glob("part-*.jsonl")}
    again = write_corpus(path, SIZE, seed=0, **SETTINGS)
    assert again["reused"] and again["files"] == manifest["files"]
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in path.glob("part-*.jsonl")}
    other = write_corpus(tmp_path, 300_000, seed=0, **SETTINGS)  # another size: written, not reused
    assert not other["reused"] and other["text_bytes"] >= 300_000
    (tmp_path / "mine.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="other jsonl files"):
        write_corpus(tmp_path, 200_000, seed=0, **SETTINGS)


def test_document_lengths_have_the_requested_log_normal_mean(corpora):
    """The mean of n log-normal lengths has standard error sd / sqrt(n), sd = mean * sqrt(exp(sigma^2) - 1)
    (1.31 x the mean for sigma = 1): with ~2000 documents that is ~3% of the mean, so 15% is ~5 standard errors
    (a false failure has probability < 1e-6; the seed is fixed anyway). Each document stops at the span boundary
    nearest its target, a few dozen bytes away, which moves the mean by well under 1%. Same for the mean of the
    log-lengths: standard error sigma / sqrt(n) ~ 0.022, tolerance 0.12."""
    path, manifest = corpora["a"]
    lengths = document_lengths(path)
    n = len(lengths)
    assert n == manifest["docs"] and 1500 < n < 2500
    se = MEAN * math.sqrt(math.exp(SIGMA**2) - 1) / math.sqrt(n)
    mean = sum(lengths) / n
    assert abs(mean - MEAN) < 5 * se, (mean, se)
    assert abs(mean - MEAN) < 0.15 * MEAN
    log_mean = sum(math.log(x) for x in lengths) / n
    assert abs(log_mean - (math.log(MEAN) - SIGMA**2 / 2)) < 5 * SIGMA / math.sqrt(n)
    assert manifest["doc_bytes"]["mean"] == pytest.approx(mean)
