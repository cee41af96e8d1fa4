"""Watch block diffusion at work: a terminal view of :func:`~bd3lm.sampling.generate`'s denoising steps.

:class:`DenoisingDisplay` is an ``on_step`` callback (:class:`~bd3lm.sampling.steps.DenoisingStep`). For every
sequence it shows the committed text (prompt + finished blocks) followed by the block being denoised, one token
per cell: a masked position is drawn as a mask glyph (``░``), a position filled at this step is highlighted, so
one sees the masked positions of a block filled in parallel over a few steps and the blocks committed one after
another.

- On a terminal (``live=None`` and a TTY): a ``rich`` live view, one panel per sequence, redrawn at every step.
- Otherwise: one plain line per step and sequence, e.g. ``block 3 step 2/4: the ░ ░ king`` (``seq 1 block ...``
  when there are several sequences; ``step 2`` when the rule fixes no step count), which logs and tests can
  read. The cells are the token pieces with their surrounding whitespace removed, joined by one space; a
  whitespace-only piece is shown as ``␣`` (spaces) / ``↵`` (newlines), and newlines inside a piece as ``↵``.

Tokens are decoded one by one (``tokenizer.decode([id])``), never a list that contains the mask id, so a partial
block never reaches a BPE decoder as a whole; the committed text is decoded as a whole (a trailing incomplete
UTF-8 sequence is held back). ``delay`` seconds are slept after every step so that a human can follow.

    display = DenoisingDisplay(tok, prompt_text, delay=0.2)
    with display:
        generate(model, ids, 64, on_step=display)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from bd3lm.sampling.steps import DenoisingStep

__all__ = ["MASK_GLYPH", "DenoisingDisplay", "DenoisingStep"]

#: What a masked position looks like.
MASK_GLYPH = "░"
#: Styles of the live view.
STYLE_PROMPT, STYLE_BLOCK, STYLE_NEW, STYLE_MASK = "bold", "cyan", "bold black on green", "dim"


def _plain_cell(piece: str) -> str:
    """One token piece as a cell of a plain line: no surrounding whitespace, no line break, never empty."""
    core = piece.strip()
    if not core:
        return piece.replace(" ", "␣").replace("\r", "").replace("\t", "⇥").replace("\n", "↵") or "∅"
    return core.replace("\r", "").replace("\t", "⇥").replace("\n", "↵")


class DenoisingDisplay:
    """An ``on_step`` callback of :func:`~bd3lm.sampling.generate` that draws every denoising step.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str`` (a Hugging Face tokenizer).
        prompt: the prompt text shown before the generated text: one string for every sequence, one per
            sequence (``None`` entries: nothing), or ``None``.
        num_sequences: sequences in the batch (default: ``len(prompt)`` for a list, else 1); with more than one,
            plain lines start with ``seq i``.
        delay: seconds to sleep after every step (>= 0; default 0).
        live: ``True``: a ``rich`` live view; ``False``: plain lines; ``None`` (default): live iff ``file`` is a
            TTY.
        file: where to write (default ``sys.stdout``).
        mask_glyph: what a masked position looks like.
        stop: stop id(s): a committed block is cut after the first one (as ``on_block`` and the output are).
        max_panels: the live view shows one panel per sequence up to this many, else a one-line summary.
        max_chars: the live view shows the last ``max_chars`` characters of the committed text.

    Attach it as ``generate(..., on_step=display)``, and call :meth:`close` afterwards (or use it as a context
    manager) to stop the live view.
    """

    def __init__(
        self,
        tokenizer,
        prompt: str | Sequence[str | None] | None = None,
        *,
        num_sequences: int | None = None,
        delay: float = 0.0,
        live: bool | None = None,
        file: TextIO | None = None,
        mask_glyph: str = MASK_GLYPH,
        stop: int | Sequence[int] | None = None,
        max_panels: int = 8,
        max_chars: int = 2000,
    ) -> None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
            raise ValueError(f"delay must be a number of seconds >= 0; got {delay!r}")
        if prompt is None or isinstance(prompt, str):
            n = 1 if num_sequences is None else num_sequences
            prompts = [prompt or ""] * n
        else:
            prompts = [p or "" for p in prompt]
            n = len(prompts) if num_sequences is None else num_sequences
            if len(prompts) != n:
                raise ValueError(f"got {len(prompts)} prompts for num_sequences={n}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_sequences must be an integer >= 1; got {num_sequences!r}")
        self.tok, self.n, self.prompts = tokenizer, n, prompts
        self.delay = float(delay)
        self.file = sys.stdout if file is None else file
        self.live = bool(getattr(self.file, "isatty", lambda: False)()) if live is None else bool(live)
        self.mask_glyph = mask_glyph
        self.stop = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
        self.max_panels, self.max_chars = max_panels, max_chars
        self.committed: list[list[int]] = [[] for _ in range(n)]
        self.committed_text = [""] * n
        self.done = [False] * n
        self.current: list[DenoisingStep | None] = [None] * n
        self.steps = 0
        self._pieces: dict[int, str] = {}
        self._live = None

    # -- the callback ---------------------------------------------------------------------------------------

    def __call__(self, step: DenoisingStep) -> None:
        self.on_step(step)

    def on_step(self, step: DenoisingStep) -> None:
        """Draw ``step`` (a plain line, or a refresh of the live view), then commit the block if it is final."""
        s = step.seq
        if s >= self.n:
            raise ValueError(f"sequence {s} reported, but the display was built for num_sequences={self.n}")
        self.steps += 1
        self.current[s] = step
        if self.live:
            self._refresh()
        else:
            self.file.write(self.line(step) + "\n")
            self.file.flush()
        if step.final:
            self._commit(s, [int(t) for t in step.block_ids.tolist()])
            self.current[s] = None
        if self.delay:
            time.sleep(self.delay)

    def close(self) -> None:
        """Stop the live view (its last frame stays on the screen)."""
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
            self._live = None

    def __enter__(self) -> DenoisingDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text -----------------------------------------------------------------------------------------------

    def piece(self, token: int) -> str:
        """The text of one token alone (cached)."""
        p = self._pieces.get(token)
        if p is None:
            p = self._pieces[token] = self.tok.decode([token])
        return p

    def text(self, seq: int) -> str:
        """Prompt + committed generated text of sequence ``seq``."""
        return self.prompts[seq] + self.committed_text[seq]

    def cells(self, step: DenoisingStep) -> list[tuple[str, str]]:
        """``(piece, kind)`` per generated position of the block: kind is ``"mask"``, ``"new"`` (changed at this
        step) or ``"token"``."""
        out = []
        for tok, masked, new in zip(
            step.block_ids.tolist(), step.masked.tolist(), step.newly_filled.tolist(), strict=True
        ):
            if masked:
                out.append((self.mask_glyph, "mask"))
            else:
                out.append((self.piece(int(tok)), "new" if new else "token"))
        return out

    def line(self, step: DenoisingStep) -> str:
        """The plain line of ``step``: ``[seq i ]block b step k/n: cell cell ...`` (``k`` counts from 1)."""
        head = f"seq {step.seq} " if self.n > 1 else ""
        count = f"{step.step + 1}" if step.total_steps is None else f"{step.step + 1}/{step.total_steps}"
        body = " ".join(p if kind == "mask" else _plain_cell(p) for p, kind in self.cells(step))
        return f"{head}block {step.block} step {count}: {body}"

    def _commit(self, seq: int, ids: list[int]) -> None:
        if self.done[seq]:
            return
        hit = next((i for i, t in enumerate(ids) if t in self.stop), None)
        if hit is not None:
            ids, self.done[seq] = ids[: hit + 1], True
        self.committed[seq].extend(ids)
        self.committed_text[seq] = self.tok.decode(self.committed[seq]).rstrip("\ufffd")

    # -- live view ------------------------------------------------------------------------------------------

    def render(self):
        """The live view's renderable: one panel per sequence (or a summary line past ``max_panels``)."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        if self.n > self.max_panels:
            cur = [c for c in self.current if c is not None]
            where = f", block {cur[0].block} step {cur[0].step + 1}" if cur else ""
            return Text(f"{self.n} sequences, {sum(map(len, self.committed))} tokens committed{where}")
        panels = []
        for s in range(self.n):
            body = Text()
            body.append(self.prompts[s], style=STYLE_PROMPT)
            shown = self.committed_text[s]
            body.append(shown[-self.max_chars :] if len(shown) > self.max_chars else shown)
            step = self.current[s]
            title = f"sequence {s}"
            if step is not None:
                for piece, kind in self.cells(step):
                    body.append(piece, style={"mask": STYLE_MASK, "new": STYLE_NEW, "token": STYLE_BLOCK}[kind])
                total = "" if step.total_steps is None else f"/{step.total_steps}"
                title += f" · block {step.block} · step {step.step + 1}{total}"
            panels.append(
                Panel(
                    body,
                    title=title,
                    title_align="left",
                    border_style="green" if self.done[s] or step is None else "blue",
                )
            )
        return Group(*panels)

    def _refresh(self) -> None:
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.render(), console=Console(file=self.file), auto_refresh=False)
            self._live.start()
        self._live.update(self.render(), refresh=True)
