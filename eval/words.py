"""Is a sample made of real words, and does a judge LM prefer it to real words in a random order?

    python -m eval.words sample=runs/quickstart/sample.txt [judge=smollm2|null] [corpus=FILE] [output=FILE.json]

For the sample text and two references of the same number of words cut from the corpus (``corpus=``, default the
embedded Shakespeare; a passage starting at a seeded random line):

* the **real-word rate** (:mod:`bd3lm.evaluation.real_words`): the share of words that occur in the corpus;
* with a judge (default SmolLM2-135M, offline), the **judge perplexity** of the sample, of the corpus passage, and
  of the same passage with its words shuffled (every word real, no syntax): a sample that reads as language
  scores below the shuffled passage.

Bad input is one ``error:`` line and exit code 2 (checked before the judge is loaded).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from eval.common import (
    RUNTIME,
    CLIError,
    dataset,
    judge,
    log,
    optional,
    output,
    set_threads,
    text,
    write_json,
)
from eval.config_checks import hydra_main, validate

__all__ = ["corpus_passage", "run_words"]


#: Every key of configs/eval/words.yaml and its check.
KEYS = {
    "sample": optional(text),
    "corpus": optional(dataset),
    "judge": optional(judge),
    **RUNTIME,
    "output": optional(output()),
}


def _read_sample(path: str | None) -> str:
    if not path:
        raise CLIError("sample=FILE is required (a UTF-8 text file, e.g. the demo's runs/quickstart/sample.txt)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"sample {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"sample {str(p)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CLIError(f"sample {str(p)!r} is empty")
    return text


def corpus_passage(docs: list[str], n_words: int, seed: int) -> str:
    """``n_words`` whitespace-separated words of running corpus text, from a seeded random line of a document."""
    rng = random.Random(seed)
    long_docs = [d for d in docs if len(d.split()) > n_words] or [max(docs, key=len)]
    doc = rng.choice(long_docs)
    lines = doc.splitlines(keepends=True)
    start = rng.randrange(len(lines))
    text = "".join(lines[start:])
    while len(text.split()) < n_words and start > 0:  # near the end of the document: start earlier
        start = max(0, start - 50)
        text = "".join(lines[start:])
    pieces = text.split(" ")
    out, count = [], 0
    for piece in pieces:  # keep the line breaks, stop after n_words words
        out.append(piece)
        count += len(piece.split())
        if count >= n_words:
            break
    return " ".join(out)


def run_words(cfg: DictConfig) -> dict[str, Any]:
    """Real-word rates (and judge perplexities) of the sample and the two corpus references."""
    a = validate(cfg, KEYS)
    sample = _read_sample(a["sample"])
    from bd3lm.data import DEFAULT_CORPUS, read_documents
    from bd3lm.evaluation.real_words import real_word_rate, shuffled_words, vocabulary

    corpus = str(a["corpus"] or DEFAULT_CORPUS)
    docs = read_documents(corpus)
    vocab = vocabulary(docs)
    n_words = len(sample.split())
    passage = corpus_passage(docs, n_words, a["seed"])
    texts = {"sample": sample, "corpus": passage, "corpus_shuffled": shuffled_words(passage, a["seed"])}
    out: dict[str, Any] = {"sample_file": a["sample"], "corpus_file": corpus, "words": n_words}
    for name, body in texts.items():
        r = real_word_rate(body, vocab)
        out[name] = {"real_word_rate": r.rate, "real_words": r.real, "words": r.total}
    if a["judge"]:
        from bd3lm.evaluation import load_judge
        from bd3lm.evaluation.sample_quality import score_texts
        from eval.bench import resolve_device

        set_threads(a["threads"])
        jd = load_judge(a["judge"], device=str(resolve_device(a["device"])))
        for name, score in zip(texts, score_texts(jd, list(texts.values())), strict=True):
            out[name]["judge_ppl"] = score.ppl
        out["judge"] = a["judge"]
        out["sample_beats_shuffled"] = out["sample"]["judge_ppl"] < out["corpus_shuffled"]["judge_ppl"]
    for name in texts:
        row = out[name]
        ppl = f", judge PPL {row['judge_ppl']:.1f}" if "judge_ppl" in row else ""
        print(f"{name:16s} {row['real_word_rate']:6.1%} real words ({row['real_words']}/{row['words']}){ppl}")
    if a["output"]:
        write_json(a["output"], out)
        log(f"wrote {a['output']}")
    return out


main = hydra_main("words", run_words)


if __name__ == "__main__":
    main()
