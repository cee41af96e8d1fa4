"""Exponential moving average (EMA) of a model's weights, as used by MDLM / BD3-LM for evaluation and export.

After every optimiser step the shadow weights move towards the live ones::

    n <- n + 1
    decay_n = min(decay, (1 + n) / (10 + n))     # warm-up: early averages are not dominated by the init
    shadow <- decay_n * shadow + (1 - decay_n) * theta

The shadow is float32 whatever the parameters' dtype; :meth:`EMA.swapped` puts it into the model (validation,
sampling, export) and always puts the live weights back. Plain PyTorch (no Lightning). The update is
:func:`torch.optim.swa_utils.get_ema_multi_avg_fn` (one ``torch._foreach_lerp_``); the rest is by hand because
the stock pieces break what the trainer relies on (lightning 2.6.6, torch 2.13):

* ``AveragedModel`` *copies* the model on its first update (the warm-up keeps 2/11 of the initial weights) and
  is a ``deepcopy`` in the module's dtype: a second copy of every buffer, no float32 average of bf16 weights
  (with decay 0.9999 the bf16 increments round away). Lightning's ``EMAWeightAveraging`` has a constant decay.
* Lightning's ``WeightAveraging`` averages the buffers (the clip interval ``sampling_eps_min/max`` must not be)
  and swaps ``parameters() + buffers()`` by position; its hook puts the live weights back before
  ``BD3LMLit.on_validation_epoch_end`` searches on the EMA ones; its checkpoint swaps live and average weights;
  its copy is made before FSDP shards the model: full-size on every rank, paired with the shards by position.

FSDP1 (``use_orig_params=True``, as Lightning's ``FSDPStrategy`` sets): a rank's ``named_parameters()`` are 1-D
views of its part of the flat parameter. The update is elementwise, so the EMA of a shard is the shard of the
EMA, bit for bit. :func:`gather_shadow` and :func:`scatter_shadow` convert between this rank's shards and the
full shadow through the model and the strategy's full-state-dict gather/load (collectives): no FSDP internals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["EMA", "gather_shadow", "scatter_shadow"]


def _clean(name: str) -> str:
    """Drop the name parts FSDP auto-wrapping and activation checkpointing insert (state dicts omit them)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class EMA:
    """Float32 shadow of ``model``'s trainable parameters, updated with :meth:`update`: ``decay`` is the long-run
    decay (0.9999 in the paper), ``warmup`` uses ``min(decay, (1 + n) / (10 + n))`` (as the official code does)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay!r}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.shadow: dict[str, Tensor] = {
            _clean(name): p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        #: The full (unsharded) shapes; the shadow holds this rank's shards after :func:`scatter_shadow`.
        self.shapes = {k: v.shape for k, v in self.shadow.items()}
        self.sharded = False
        self._backup: dict[str, Tensor] | None = None

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping) -> EMA:
        """An EMA of ``model`` holding ``state`` (a :meth:`state_dict`, e.g. a checkpoint's ``bd3lm.ema``)."""
        ema = cls(model, float(state["decay"]), bool(state.get("warmup", True)))
        ema.load_state_dict(state)
        return ema

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        params = {_clean(name): p for name, p in model.named_parameters()}
        if missing := [k for k in self.shadow if k not in params]:
            raise KeyError(f"EMA shadow has parameters the model lacks: {missing[:5]}")
        yield from ((name, params[name]) for name in self.shadow)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current parameters (call after each optimiser step)."""
        if self._backup is not None:
            raise RuntimeError("EMA.update called while the EMA weights are swapped into the model")
        decay, self.num_updates = self.current_decay(), self.num_updates + 1
        ps = list(self._params(model))
        self.shadow.update({k: self.shadow[k].to(p.device) for k, p in ps})  # the same tensor when already there
        if ps:  # p.float() is no copy for float32 parameters
            get_ema_multi_avg_fn(decay)([self.shadow[k] for k, _ in ps], [p.detach().float() for _, p in ps], None)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Back up ``model``'s live parameters and load the shadow weights into it."""
        if self._backup is not None:
            raise RuntimeError("the EMA weights are already swapped in")
        self._backup = {name: p.detach().clone() for name, p in self._params(model)}
        for name, p in self._params(model):
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the live parameters saved by :meth:`store` (no-op when nothing is swapped in)."""
        backup, self._backup = self._backup, None
        for name, p in self._params(model) if backup is not None else ():
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
        """Plain state (``torch.load(weights_only=True)``); once sharded, the shadow is this rank's shards."""
        shadow = {k: v.detach().clone() for k, v in self.shadow.items()}
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state: Mapping) -> None:
        """Load a :meth:`state_dict` with the full shadow (names and shapes must match exactly); the shadow
        becomes the full one (``sharded`` is reset: call :func:`scatter_shadow` again if needed)."""
        shadow = state["shadow"]
        missing, unexpected = sorted(set(self.shapes) - set(shadow)), sorted(set(shadow) - set(self.shapes))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in shadow.items():
            if tuple(v.shape) != tuple(self.shapes[k]):
                raise ValueError(
                    f"EMA state for {k} has shape {tuple(v.shape)}, the model expects {tuple(self.shapes[k])}"
                )
        self.decay, self.warmup = float(state["decay"]), bool(state.get("warmup", True))
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: shadow[k].to(device=self.shadow[k].device, dtype=torch.float32).clone() for k in self.shapes}
        self.sharded = False


def _require_float32(ema: EMA, model: nn.Module) -> None:
    """The shards travel through the model's parameters: only float32 parameters carry them exactly."""
    if low := sorted({str(p.dtype) for _, p in ema._params(model) if p.dtype != torch.float32}):
        raise ValueError(
            f"the EMA of sharded weights needs float32 parameters (e.g. precision bf16-mixed, not bf16-true); "
            f"got {', '.join(low)}"
        )


@torch.no_grad()
def gather_shadow(ema: EMA, model: nn.Module, gather_full: Callable[[], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The full shadow (float32 copies) of a sharded ``model``: this rank's shards go into ``model`` while
    ``gather_full()`` (a collective: every rank calls this) returns its full parameters, keyed like ``ema.shadow``
    (nothing, hence ``{}``, on ranks that receive nothing)."""
    _require_float32(ema, model)
    with ema.swapped(model):
        full = gather_full()
    if not full:
        return {}
    for k, shape in ema.shapes.items():
        got = tuple(full[k].shape) if full.get(k) is not None else None
        if got != tuple(shape):
            raise ValueError(f"gathering the EMA: {k} came back as {got}, expected the full shape {tuple(shape)}")
    return {k: full[k].detach().to(torch.float32, copy=True) for k in ema.shapes}


@torch.no_grad()
def scatter_shadow(
    ema: EMA, model: nn.Module, full: Mapping[str, Tensor], load_full: Callable[[dict[str, Tensor]], None]
) -> None:
    """Inverse of :func:`gather_shadow`: ``load_full(weights)`` (a collective: every rank calls this) loads
    ``full`` into the sharded ``model``, this rank's shards become the shadow and the live weights come back."""
    _require_float32(ema, model)
    if ema.is_swapped:
        raise RuntimeError("scatter_shadow called while the EMA weights are swapped into the model")
    live = {k: p.detach().clone() for k, p in ema._params(model)}
    try:
        load_full({k: full[k] for k in ema.shapes})
        ema.shadow = {k: p.detach().float().clone() for k, p in ema._params(model)}
        ema.sharded = True
    finally:
        for k, p in ema._params(model):
            p.copy_(live[k])
