"""Column layout of a batch of prompts and the sliding-window policy.

**Block alignment and left padding.** Blocks are aligned to absolute positions as in training: position ``p``
belongs to block ``p // L'``. A prompt of ``P_i`` tokens has ``floor(P_i / L')`` complete blocks; the
remaining ``P_i mod L'`` tokens fill the first positions of the first generated block (never changed) and only
the rest of that block is denoised. A batch shares one column grid: sequence ``i`` is left-padded by whole
blocks, ``pad_i = (NB - floor(P_i / L')) L'`` with ``NB = max_i floor(P_i / L')``, so every sequence's current
block is the same column block. Sequence ``i``'s rotary position of column ``c`` is ``c - pad_i`` (its own
position), pads are never attended (key padding) and a pad query attends to itself only. For autoregressive
models ``L' = 1``.

**Window.** A sequence attends to at most ``W`` positions: when the inputs of the next model call end at own
position ``e`` (exclusive: the end of the current block for BD3, the last known token + 1 for AR), the window
starts at ``ws = S * ceil(max(0, e - W) / S)`` where ``S`` (the stride, a multiple of ``L'``) is how many of
the oldest positions are dropped at once. Positions before ``ws`` are not attended. Because ``ws`` depends
only on the sequence's own positions, a sequence in a batch sees exactly the same window as when generated
alone.

**Stride (the window policy's trade-off).** In the exact mode every slide re-encodes the surviving window, so a
stride of ``L'`` (the most context: ``W - L'`` positions before every block) re-encodes ``W - L'`` positions per
block and the cost per block grows with the window instead of the block. The default stride is half the window
(rounded down to whole blocks, at least ``L'``), as in the official long-sample protocol (512 clean + 512 new
tokens at ``W = 1024``): one re-encode of ``W/2`` positions per ``W/2`` generated, so the cost per token stays
that of the first window, and every block still sees at least ``W/2`` positions of context. The streaming mode
never re-encodes, so it keeps the most-context stride ``L'`` at no cost (its keys and values are stale instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WindowPolicy", "column_layout", "default_stride", "window_start"]


def column_layout(lengths: list[int], block_size: int) -> tuple[int, list[int], list[int]]:
    """``(NB, pads, remainders)`` of the shared column grid for prompts of ``lengths`` tokens.

    ``NB`` is the number of complete prompt blocks of the longest prompt (the column block index of the first
    generated block), ``pads[i] = (NB - floor(P_i / L')) L'`` and ``remainders[i] = P_i mod L'``.
    """
    full = [p // block_size for p in lengths]
    nb = max(full) if full else 0
    return nb, [(nb - f) * block_size for f in full], [p % block_size for p in lengths]


def window_start(in_end: int, pad: Tensor, window: int, stride: int) -> Tensor:
    """Column where each sequence's window starts, for model inputs ending at column ``in_end`` (exclusive).

    ``pad`` (B,) are the sequences' left pads (column of their own position 0). Returns (B,) long columns
    ``pad + S * ceil(max(0, in_end - pad - W) / S)``.
    """
    over = (in_end - pad - window).clamp(min=0)
    return pad + torch.div(over + stride - 1, stride, rounding_mode="floor") * stride


def default_stride(window: int, block_size: int, streaming: bool) -> int:
    """The default ``window_stride``: ``L'`` when ``streaming`` (nothing is re-encoded), else half the window in
    whole blocks, at least one block (see the module docstring)."""
    if streaming:
        return block_size
    return max(block_size, (window // 2) // block_size * block_size)


class WindowPolicy:
    """Where each sequence's window starts, and when the exact mode must re-encode.

    Invariant: for model inputs ending at column ``e``, sequence ``i`` attends exactly the columns
    ``[window_start(e, pad_i, W, S), e)`` (its own positions, so batching never changes what a sequence sees).
    The exact mode's cached keys/values are valid only for the window starts they were encoded with: when any
    sequence's start moves, the surviving window is re-encoded. All of this is host arithmetic (no device sync).
    """

    def __init__(self, pad: list[int], window: int, stride: int, exact: bool) -> None:
        self.pad = torch.tensor(pad, dtype=torch.long)
        self.window, self.stride, self.exact = window, stride, exact

    def starts(self, in_end: int) -> Tensor:
        """(B,) CPU long: each sequence's window start for inputs ending at column ``in_end``."""
        return window_start(in_end, self.pad, self.window, self.stride)

    def rotary_base(self, ws: Tensor) -> Tensor:
        """Column of rotary position 0 per row: the window start (exact: positions relative to the window, as
        a from-scratch recomputation sees them) or the left pad (streaming: absolute positions)."""
        return ws if self.exact else self.pad

    def needs_reencode(self, ws: Tensor, encoded_with: Tensor | None) -> bool:
        """Whether keys/values encoded with window starts ``encoded_with`` are stale for the starts ``ws``."""
        return encoded_with is None or (self.exact and not torch.equal(ws, encoded_with))

    def select(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (CPU indices)."""
        self.pad = self.pad[rows]
