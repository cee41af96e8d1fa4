"""First-hitting sampler (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models
and exploit inaccurate categorical sampling", §4; the default sampler of MDLM and BD3-LM).

Under the absorbing process every masked position of a block is revealed at an independent, identically
distributed time, so the next position to be revealed is uniform over the masked ones, and the token it takes
is a draw from ``p_theta(x0)`` at that position. The time of that event is irrelevant to a model without time
conditioning, hence this rule reveals exactly one uniformly chosen masked position per network call.

NFE per block = number of positions generated in it (the engine commits a finished block with the next block's
first call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.rules import BlockRule

__all__ = ["FirstHittingRule"]


class FirstHittingRule(BlockRule):
    """Reveal one position per step, uniform over the row's ``todo`` positions, with a token ~ p(x0)."""

    name = "first_hitting"
    reveals_one_per_step = True
    always_reveals = True

    def reads(self, todo: Tensor, sampler: TokenSampler) -> Tensor | None:
        """The position to reveal, (B, 1), drawn before the network call since it does not depend on the
        logits."""
        return self._position(todo, sampler)

    @staticmethod
    def _position(todo: Tensor, sampler: TokenSampler) -> Tensor:
        """(B, 1): uniform over the row's ``todo`` positions (i.i.d. uniforms, argmax)."""
        b, n = todo.shape
        score = sampler.uniform((b, n), todo.device).masked_fill(~todo, -1.0)
        return score.argmax(dim=-1, keepdim=True)

    def step(
        self, logits: Tensor, todo: Tensor, sampler: TokenSampler, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if positions is None:  # called with the whole block's logits
            positions = self._position(todo, sampler)
            logits = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))
        rows = torch.arange(todo.shape[0], device=todo.device)
        pos = positions[:, 0]
        chosen = sampler.sample(logits[:, 0])  # (B,)
        reveal = torch.zeros_like(todo)
        reveal[rows, pos] = True
        reveal &= todo
        tokens = torch.zeros(todo.shape, dtype=torch.long, device=todo.device)
        tokens[rows, pos] = chosen
        return tokens, reveal
