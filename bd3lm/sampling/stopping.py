"""The stopping rule of :func:`~bd3lm.sampling.generate`: which rows are done, and what each row generated.

A row stops at the first of: a stop id (EOS, kept in the output), ``max_new_tokens`` generated tokens, or — with
``stop_entropy`` — the unigram entropy of its last :data:`ENTROPY_WINDOW` generated tokens falling below the
threshold (the official sampler's degenerate-sample stop, which uses 4.0 nats).

When no rule reads token values (no stop ids, no entropy stop, no ``on_block`` callback) every stop is decided
by counting, so finished blocks stay on the device and are copied to the host once, at the end: the hot path
makes no device-to-host copy per block.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["ENTROPY_WINDOW", "Stopping", "unigram_entropy"]

#: The entropy stop looks at the unigram entropy of this many most recent generated tokens (official value).
ENTROPY_WINDOW = 256


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical unigram distribution of ``tokens`` (0 for none); the entropy stop's
    statistic, and the entropy that sample-quality evaluation reports."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


class Stopping:
    """Per-sequence record of generated tokens and stop reasons.

    Invariant: a sequence is active until exactly one reason (``"eos"``, ``"max_new_tokens"``, ``"entropy"``)
    is recorded for it; its recorded tokens are its generated tokens up to and including the first stop id,
    and never more than ``max_new_tokens``.
    """

    def __init__(
        self,
        n: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        stop_entropy: float | None,
        on_block: Callable[[int, Tensor], None] | None,
    ) -> None:
        self.max_new = max_new_tokens
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.stop_entropy = stop_entropy
        self.on_block = on_block
        self.count = [0] * n
        self.reasons = [""] * n
        self.nfe_seq = [0] * n
        self.tails: list[deque[int]] = [deque(maxlen=ENTROPY_WINDOW) for _ in range(n)]
        self._host: list[list[Tensor]] = [[] for _ in range(n)]
        self._blocks: list[tuple[list[int], Tensor, list[int], list[int]]] = []
        self.reads_tokens = bool(self.stop_ids.numel()) or stop_entropy is not None or on_block is not None

    def budget(self, ids: Sequence[int]) -> list[int]:
        """Tokens each of the sequences ``ids`` may still generate."""
        return [self.max_new - self.count[i] for i in ids]

    def record(self, ids: Sequence[int], x: Tensor, lo: list[int], hi: list[int], nfe: int) -> list[bool]:
        """Record the new tokens ``x[r, lo[r]:hi[r]]`` of row ``r`` (sequence ``ids[r]``) after ``nfe`` network
        calls; return, per row, whether it continues."""
        if not self.reads_tokens:
            self._blocks.append((list(ids), x, lo, hi))
            keep = []
            for r, sid in enumerate(ids):
                self.count[sid] += hi[r] - lo[r]
                keep.append(self._stop(sid, "max_new_tokens" if self.count[sid] >= self.max_new else "", nfe))
            return keep
        xc = x.cpu()
        keep = []
        for r, sid in enumerate(ids):
            new = xc[r, lo[r] : hi[r]]
            reason = ""
            if self.stop_ids.numel():
                hits = torch.isin(new, self.stop_ids).nonzero()
                if hits.numel():
                    new, reason = new[: int(hits[0]) + 1], "eos"
            self._host[sid].append(new)
            self.count[sid] += new.numel()
            if not reason and self.count[sid] >= self.max_new:
                reason = "max_new_tokens"
            if self.stop_entropy is not None and not reason:
                tail = self.tails[sid]
                tail.extend(new.tolist())
                if len(tail) == ENTROPY_WINDOW and unigram_entropy(tail) < self.stop_entropy:
                    reason = "entropy"
            if self.on_block is not None and new.numel():
                self.on_block(sid, new)
            keep.append(self._stop(sid, reason, nfe))
        return keep

    def _stop(self, sid: int, reason: str, nfe: int) -> bool:
        if reason:
            self.reasons[sid], self.nfe_seq[sid] = reason, nfe
        return not reason

    def outputs(self) -> list[Tensor]:
        """Per sequence, its generated tokens as one 1-D CPU long tensor."""
        for ids, x, lo, hi in self._blocks:
            xc = x.cpu()
            for r, sid in enumerate(ids):
                self._host[sid].append(xc[r, lo[r] : hi[r]])
        self._blocks.clear()
        return [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in self._host]
