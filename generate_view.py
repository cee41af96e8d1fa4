"""What ``generate.py`` knows while :func:`bd3lm.sampling.generate` runs: :class:`Progress` (each sample's tokens,
stop reason and NFE, so that an interrupted run keeps its finished samples) and :class:`Display` (the text,
block by block)."""

from __future__ import annotations

import sys

from bd3lm.sampling.stopping import ENTROPY_WINDOW, unigram_entropy

MAX_PANELS = 8


class Progress:
    """Per sample: generated ids, stop reason (``""`` while running) and NFE, from ``generate``'s callbacks.

    ``on_block`` reports a sample's new tokens before ``generate`` decides whether it stops, so the stop is
    decided here by the same rule as :class:`bd3lm.sampling.stopping.Stopping`: the stop id ends the tokens of
    its block, then ``max_new_tokens``, then the entropy of the last :data:`ENTROPY_WINDOW` tokens. The NFE of
    a sample is the number of network calls made when it stopped (``on_logits`` is called once per call).
    """

    def __init__(self, n: int, max_new_tokens: int, stop_id: int | None, stop_entropy: float | None) -> None:
        self.max_new, self.stop_id, self.stop_entropy = max_new_tokens, stop_id, stop_entropy
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.reasons = [""] * n
        self.nfe = [0] * n
        self.calls = 0

    def on_logits(self, rows: list[int], logits) -> None:
        """``generate``'s ``on_logits``: counts the network calls."""
        self.calls += 1

    def add(self, i: int, new_ids: list[int]) -> str:
        """Record sample ``i``'s new ids; return its stop reason (``""``: it continues)."""
        ids = self.ids[i]
        ids.extend(new_ids)
        reason = ""
        if self.stop_id is not None and new_ids and new_ids[-1] == self.stop_id:
            reason = "eos"
        elif len(ids) >= self.max_new:
            reason = "max_new_tokens"
        elif (self.stop_entropy is not None and len(ids) >= ENTROPY_WINDOW
              and unigram_entropy(ids[-ENTROPY_WINDOW:]) < self.stop_entropy):
            reason = "entropy"
        if reason:
            self.reasons[i], self.nfe[i] = reason, self.calls
        return reason


class Display:
    """Prints samples block by block: ``rich`` live panels on a TTY; otherwise one sample streams as plain text
    and several are printed each when it finishes."""

    def __init__(self, tok, progress: Progress, prompts: list[str | None], enabled: bool) -> None:
        self.tok, self.progress, self.prompts = tok, progress, prompts
        self.n = len(prompts)
        self.shown = [""] * self.n
        self.printed = [False] * self.n
        self.enabled = enabled
        self.rich = enabled and sys.stdout.isatty()
        self.live = None
        self.streamed_plain = enabled and not self.rich and self.n == 1
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            self.live = Live(self._render(), console=self.console, refresh_per_second=8)
            self.live.start()
        elif self.streamed_plain and prompts[0]:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()

    def text(self, i: int) -> str:
        """Decoded generated text of sample i, without a trailing incomplete UTF-8 sequence."""
        return self.tok.decode(self.progress.ids[i], skip_special_tokens=False).rstrip("\ufffd")

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        done = [bool(r) for r in self.progress.reasons]
        if self.n > MAX_PANELS:
            return Text(
                f"{sum(done)}/{self.n} samples finished, {sum(len(x) for x in self.progress.ids)} tokens generated"
            )
        panels = []
        for i in range(self.n):
            body = Text(self.prompts[i] or "", style="bold")
            body.append(self.shown[i][-2000:])
            panels.append(Panel(body, title=f"sample {i}", border_style="green" if done[i] else "blue"))
        return Group(*panels)

    def _print(self, i: int, reason: str) -> None:
        self.printed[i] = True
        print(f"===== sample {i} ({reason}) =====")
        print((self.prompts[i] or "") + self.text(i), flush=True)

    def on_block(self, i: int) -> None:
        """Sample ``i`` has new tokens (in ``progress``)."""
        if not self.enabled:
            return
        text = self.text(i)
        if self.streamed_plain:
            delta = text[len(self.shown[i]) :] if text.startswith(self.shown[i]) else "\n" + text
            sys.stdout.write(delta)
            sys.stdout.flush()
        self.shown[i] = text
        if self.live is not None:
            self.live.update(self._render())
        elif not self.streamed_plain and self.progress.reasons[i]:
            self._print(i, self.progress.reasons[i])

    def finish(self, reasons: list[str]) -> None:
        """Generation is over: show every sample not shown yet."""
        if not self.enabled:
            return
        for i in range(self.n):
            self.shown[i] = self.text(i)
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            if self.n > MAX_PANELS:
                for i in range(self.n):
                    self.console.rule(f"sample {i} ({reasons[i]})")
                    self.console.print((self.prompts[i] or "") + self.shown[i], markup=False, highlight=False)
        elif self.streamed_plain:
            sys.stdout.write("\n")
        else:
            for i in range(self.n):
                if not self.printed[i]:
                    self._print(i, reasons[i])
        sys.stdout.flush()

    def abort(self, quiet: bool = False) -> None:
        """Generation stopped early (an interrupt, or an error when ``quiet``): end the live view; show the
        finished samples a summary view hid."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.stop()
            if self.n > MAX_PANELS and not quiet:
                for i, reason in enumerate(self.progress.reasons):
                    if reason:
                        self.console.rule(f"sample {i} ({reason})")
                        self.console.print((self.prompts[i] or "") + self.text(i), markup=False, highlight=False)
        elif self.streamed_plain:
            sys.stdout.write("\n")
        sys.stdout.flush()
