"""Exponential moving average (EMA) of a model's weights, as used by MDLM / BD3-LM for evaluation and export.

After every optimiser step the shadow weights move towards the live ones::

    n <- n + 1
    decay_n = min(decay, (1 + n) / (10 + n))     # warm-up: early averages are not dominated by the init
    shadow <- decay_n * shadow + (1 - decay_n) * theta

The shadow weights are kept in float32 whatever the parameters' dtype. :meth:`EMA.swapped` temporarily puts
them into the model (for validation, sampling and export) and always puts the live weights back, even when the
body raises. The class is plain PyTorch (no Lightning) so it can be used by any training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Shadow copy of the trainable parameters of a module, updated with :meth:`update`.

    Args:
        model: the module whose parameters (``requires_grad=True`` ones) are averaged; the shadow starts as
            a copy.
        decay: the long-run decay (0.9999 in the paper).
        warmup: use the warm-up ``min(decay, (1 + n) / (10 + n))`` (on by default, as in the official code).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self._backup: dict[str, Tensor] | None = None

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        params = dict(model.named_parameters())
        missing = [k for k in self.shadow if k not in params]
        if missing:
            raise KeyError(f"EMA shadow has parameters the model lacks: {missing[:5]}")
        for name in self.shadow:
            yield name, params[name]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current parameters (call after each optimiser step)."""
        if self._backup is not None:
            raise RuntimeError("EMA.update called while the EMA weights are swapped into the model")
        decay = self.current_decay()
        self.num_updates += 1
        for name, p in self._params(model):
            s = self.shadow[name]
            if s.device != p.device:
                s = self.shadow[name] = s.to(p.device)
            s.lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the shadow weights (no backup; see :meth:`swapped`)."""
        for name, p in self._params(model):
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Back up ``model``'s live parameters and load the shadow weights into it."""
        if self._backup is not None:
            raise RuntimeError("the EMA weights are already swapped in")
        self._backup = {name: p.detach().clone() for name, p in self._params(model)}
        self.copy_to(model)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the live parameters saved by :meth:`store` (no-op when nothing is swapped in)."""
        if self._backup is None:
            return
        backup, self._backup = self._backup, None
        for name, p in self._params(model):
            p.copy_(backup[name])

    @property
    def is_swapped(self) -> bool:
        """True between :meth:`store` and :meth:`restore`."""
        return self._backup is not None

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: ``model`` holds the EMA weights inside the block, its live weights afterwards."""
        self.store(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow weights to ``device`` (in place); returns ``self``."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """Plain state, loadable with ``torch.load(weights_only=True)``: decay, warm-up, count, shadow."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`; the parameter names and shapes must match exactly."""
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for k, v in shadow.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise ValueError(
                    f"EMA state for {k} has shape {tuple(v.shape)}, "
                    f"the model expects {tuple(self.shadow[k].shape)}"
                )
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", True))
        self.num_updates = int(state["num_updates"])
        self.shadow = {
            k: shadow[k].to(device=self.shadow[k].device, dtype=torch.float32).clone() for k in self.shadow
        }
