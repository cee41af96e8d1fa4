"""Real-word rate: counted by hand on small texts, and the embedded corpus scores 1 against itself."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest

from bd3lm.evaluation.real_words import real_word_rate, shuffled_words, vocabulary, words

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "shakespeare.txt.gz"


def test_words_are_letter_runs_case_folded():
    assert words("To be, or not to BE: that's 2nd_place O'er-thrown Ærø") == [
        "to", "be", "or", "not", "to", "be", "that", "s", "nd", "place", "o", "er", "thrown", "ærø",
    ]
    assert words("123 ... --") == []


def test_rate_counted_by_hand():
    vocab = vocabulary(["The king is dead.", "Long live the KING!"])
    assert vocab == {"the", "king", "is", "dead", "long", "live"}
    r = real_word_rate("The kingg is dead, long live thee king", vocab)  # 8 words; "kingg" and "thee" are not real
    assert (r.real, r.total) == (6, 8) and r.rate == 0.75
    assert real_word_rate("?!", vocab).rate == 0.0


def test_corpus_against_itself_and_shuffling_keeps_the_words():
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()[:200_000]
    vocab = vocabulary([text])
    assert real_word_rate(text, vocab).rate == 1.0
    shuffled = shuffled_words(text, seed=3)
    assert Counter(shuffled.split()) == Counter(text.split())
    assert shuffled.split() != text.split() and shuffled == shuffled_words(text, seed=3)


def test_eval_words_cli(tmp_path, capsys):
    """``python -m eval.words`` (its ``main``, in-process): the sample's rate counted by hand; the corpus passage
    and its shuffle are all real words and have the sample's word count; bad input is one line, exit 2."""
    import json

    from eval.words import main

    sample = tmp_path / "sample.txt"
    sample.write_text("ROMEO:\nWhat thouest say, my lordd? Exeunt.\n", encoding="utf-8")  # 7 words, 2 made up
    out = tmp_path / "words.json"
    main([f"sample={sample}", "judge=null", f"output={out}"])
    res = json.loads(out.read_text())
    assert (res["sample"]["real_words"], res["sample"]["words"]) == (5, 7)
    assert res["corpus"]["real_word_rate"] == res["corpus_shuffled"]["real_word_rate"] == 1.0
    assert res["corpus_file"].endswith("shakespeare.txt.gz")
    assert res["words"] == 7  # whitespace-separated pieces of the sample: the passages are cut to this length
    assert 7 <= res["corpus"]["words"] <= 12 and res["corpus_shuffled"]["words"] == res["corpus"]["words"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["judge=null"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: sample=FILE is required")
