"""What the ``on_step`` hook of :func:`~bd3lm.sampling.generate` receives: one :class:`DenoisingStep` per
sequence after every denoising step of the block engine (:mod:`bd3lm.sampling.engine`).

The engine calls :func:`report_step` only when a hook is given, so a run without one keeps no previous state,
copies nothing to the host and makes no extra sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

__all__ = ["DenoisingStep", "SteppingEngine", "report_step"]


@dataclass(frozen=True)
class DenoisingStep:
    """The state of one sequence's current block after one denoising step.

    Attributes:
        seq: the sequence's index in the output (``GenerationResult.sequences``).
        block: the block's index in the sequence: it covers the positions ``[block L', (block + 1) L')`` of
            ``prompt + generated`` (AR models: L' = 1, so ``block`` is the token's position). The first block has
            index ``floor(len(prompt) / L')``; the next blocks follow one by one.
        step: 0-based index of the step within the block. A sequence takes part in a step while its block has
            masked positions left (absorbing rules) or at every call (rewriting rules), so its steps are
            ``0, 1, ..., n - 1`` with:

            - first_hitting: ``n`` = the positions generated in the block (one revealed per step);
            - ddpm: ``n <= T`` (``steps``): step ``T - 1`` reveals everything left, and the block ends as soon as
              nothing is left (a step may reveal nothing);
            - confidence: ``n <=`` the positions generated (each step reveals at least one);
            - analytic / euler: ``n = steps + 1`` (the predictor calls and the denoiser);
            - AR models: ``n = 1``.
        total_steps: ``n`` when the rule fixes it in advance (first_hitting, analytic, euler, AR), ``T`` for ddpm
            (an upper bound), ``None`` otherwise (confidence, custom rules).
        start: offset in the block of the first generated position (the prompt's last ``len(prompt) mod L'``
            tokens fill the first block's positions before it; 0 for the other blocks).
        block_ids: (n_gen,) CPU long: the block's generated positions ``[start, start + n_gen)`` after this step,
            ``mask_id`` where still masked (``n_gen < L' - start`` only in the last block, cut by
            ``max_new_tokens``). At the last step they are the tokens ``on_block`` receives (which are cut after
            a stop id).
        newly_filled: (n_gen,) CPU bool: the positions whose token changed at this step (revealed ones for the
            absorbing rules; rewritten ones too for analytic / euler on a uniform or roulette graph).
        mask_id: the model's mask token id.
        final: this is the block's last step (every position decided; the block is committed next).
    """

    seq: int
    block: int
    step: int
    total_steps: int | None
    start: int
    block_ids: Tensor
    newly_filled: Tensor
    mask_id: int
    final: bool

    @property
    def masked(self) -> Tensor:
        """(n_gen,) bool: the positions still masked."""
        return self.block_ids == self.mask_id


class _Stopping(Protocol):
    count: Sequence[int]  # tokens generated so far, by sequence


class SteppingEngine(Protocol):
    """What :func:`report_step` reads of the block engine (:class:`bd3lm.sampling.engine.BlockEngine`)."""

    on_step: Callable[[DenoisingStep], None]
    ids: Sequence[int]  # the sequence index of each active row
    prompt_len: Sequence[int]
    stopping: _Stopping
    bs: int
    mask: int


def report_step(
    engine: SteppingEngine,
    prev: Tensor,
    x: Tensor,
    lo: list[int],
    hi: list[int],
    k: int,
    total: list[int | None],
    final: bool | None = None,
) -> None:
    """Hand step ``k`` of the engine's current block (``prev`` -> ``x``, (B, L')) to its ``on_step`` hook, one
    :class:`DenoisingStep` per row that takes part in it: a row whose generated span has no mask left before the
    step is done (absorbing rules, ``final=None``: the step is final when no mask is left after it)."""
    xc, pc, mask = x.cpu(), prev.cpu(), engine.mask
    for r, sid in enumerate(engine.ids):
        before, ids = pc[r, lo[r] : hi[r]], xc[r, lo[r] : hi[r]].clone()
        if final is None:
            if not bool((before == mask).any()):
                continue
            last = not bool((ids == mask).any())
        else:
            last = final
        engine.on_step(
            DenoisingStep(
                seq=sid,
                block=(engine.prompt_len[sid] + engine.stopping.count[sid]) // engine.bs,
                step=k,
                total_steps=total[r],
                start=lo[r],
                block_ids=ids,
                newly_filled=ids != before,
                mask_id=mask,
                final=last,
            )
        )
