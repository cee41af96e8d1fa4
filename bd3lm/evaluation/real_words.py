"""Real-word rate: the share of a text's words that occur in a reference corpus.

A cheap, model-free check of generated text that anyone can read: with a subword or character tokenizer a model
must *compose* words out of pieces, and an undertrained one writes ``"thed"`` or ``"forves"``. The rate is

    real(text) = #{ words w of text : w in vocabulary(corpus) } / #{ words of text }

where a *word* is a maximal run of letters (any script; digits, ``_`` and punctuation separate words, so
``"o'er"`` is the two words ``o`` and ``er`` in both the text and the corpus), compared case-insensitively.
Real Shakespeare scores 1.0 against its own corpus by construction.

:func:`shuffled_words` builds the reference a judge LM should rank *below* a good sample: corpus text with its
words shuffled (every word real, no syntax).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["RealWords", "real_word_rate", "shuffled_words", "vocabulary", "words"]

_WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (maximal runs of letters)."""
    return [w.casefold() for w in _WORD.findall(text)]


def vocabulary(texts: Iterable[str]) -> frozenset[str]:
    """Every word that occurs in ``texts``."""
    vocab: set[str] = set()
    for text in texts:
        vocab.update(words(text))
    return frozenset(vocab)


@dataclass(frozen=True)
class RealWords:
    """``real`` of ``total`` words occur in the vocabulary; ``rate = real / total`` (0.0 for a text without words)."""

    real: int
    total: int

    @property
    def rate(self) -> float:
        return self.real / self.total if self.total else 0.0


def real_word_rate(text: str, vocab: frozenset[str] | set[str]) -> RealWords:
    """How many of the words of ``text`` occur in ``vocab`` (see the module docstring for what a word is)."""
    ws = words(text)
    return RealWords(real=sum(w in vocab for w in ws), total=len(ws))


def shuffled_words(text: str, seed: int = 0) -> str:
    """``text`` with its whitespace-separated words in a random order (seeded), joined by single spaces."""
    pieces = text.split()
    random.Random(seed).shuffle(pieces)
    return " ".join(pieces)
