"""Within-block update rules: the interface (the rules by name: :mod:`bd3lm.sampling.registry`).

A BD3-LM block is denoised from all-mask to clean by repeated calls to the network, each returning raw logits
of ``p_theta(x0^b | x_t^b, x^{<b})`` for the block's L' positions (Arriola et al. 2025, §3–4). An update rule
decides, from those logits, which still-masked positions to reveal at this step and with which tokens.
Revealed tokens are frozen (the carry-over of SUBS). The engine (:mod:`bd3lm.sampling.engine`) runs the model
only when the block changed since the last call, so a rule step that reveals nothing costs no network
evaluation.

Rules see a boolean ``todo`` (B, L') of positions still to generate. Positions outside ``todo`` (prompt tokens
of a block the prompt ends in, already revealed tokens, positions past ``max_new_tokens``) are never touched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler

__all__ = ["BlockRule", "scatter_tokens"]


class BlockRule(ABC):
    """One within-block denoising rule.

    Subclasses implement :meth:`step`; :meth:`start_block` resets per-block state (called before the first
    step of every block). A step must reveal at least one ``todo`` position per row within a finite number of
    calls so that every block terminates.
    """

    name: ClassVar[str] = ""
    #: Every step reveals exactly one ``todo`` position of every row that has one (the engine then knows the
    #: number of steps in advance and never reads ``todo`` back from the device).
    reveals_one_per_step: ClassVar[bool] = False
    #: Every step reveals at least one ``todo`` position of every row that has one (no "nothing changed" check).
    always_reveals: ClassVar[bool] = False

    def start_block(self, todo: Tensor) -> None:  # noqa: B027 - optional hook, stateless rules need nothing
        """Reset per-block state; ``todo`` (B, L') marks the positions to generate in this block."""

    def reads(self, todo: Tensor, sampler: TokenSampler) -> Tensor | None:
        """Before a network call: the positions (B, k) whose logits the next :meth:`step` reads, when the rule
        knows them in advance, else ``None`` (all L'). A rule that returns positions then receives logits
        (B, k, V) at those positions and ``positions=`` in :meth:`step`; the network skips the rest."""
        return None

    @abstractmethod
    def step(self, logits: Tensor, todo: Tensor, sampler: TokenSampler) -> tuple[Tensor, Tensor]:
        """One update from raw ``logits`` (B, L', V) of the current block.

        Returns ``(tokens, reveal)``: ``tokens`` (B, L') long (only read where ``reveal``) and ``reveal``
        (B, L') bool, a subset of ``todo``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def scatter_tokens(todo_like: Tensor, where: Tensor, values: Tensor) -> Tensor:
    """A (B, L') long tensor with ``values`` (M,) at the ``where`` (B, L') positions and 0 elsewhere."""
    out = torch.zeros(todo_like.shape, dtype=torch.long, device=todo_like.device)
    out[where] = values
    return out
