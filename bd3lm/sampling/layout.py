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
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["column_layout", "window_start"]


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
