"""Lightning wrapper for training BD3-LM, MDLM (block size = L) and AR models.

The loss is :func:`bd3lm.objectives.loss`, validation :func:`bd3lm.objectives.nelbo`, the clip-interval search
:func:`bd3lm.schedule_search.clipped_schedule_search`. What lives here is the training state around them:

* the optimizer of the settings (AdamW, lr 3e-4, in the paper) with linear warm-up, then constant or cosine;
* an :class:`~bd3lm.ema.EMA` of the weights, swapped in for validation (and used for sampling/export); under
  FSDP each rank averages its shards and checkpoints hold the full shadow (:meth:`BD3LMLit.ema_state_dict`);
* one noise generator per rank (:func:`bd3lm.noise.rank_generator`), whose state is checkpointed;
* the training clip interval, in the model buffers ``sampling_eps_min/max`` (so checkpoints and exports carry
  it), replaced by the search winner every ``search_every`` validation rounds;
* everything needed for an exact resume (RNG states of every rank, data position, EMA, search round).

Data, callbacks and checkpoints live in the other modules of :mod:`bd3lm.training`, the only package (with
``train.py``) that imports Lightning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from transformers import get_scheduler

from bd3lm.ema import EMA, gather_shadow, scatter_shadow
from bd3lm.faults import Refused, dumps
from bd3lm.model import BD3LM
from bd3lm.noise import rank_generator
from bd3lm.objectives import FULL_RANGE, is_score_family, loss, nelbo
from bd3lm.schedule_search import clipped_schedule_search, default_candidates
from bd3lm.training.checkpoint import rng_state, set_rng_state

__all__ = ["BD3LMLit", "TrainSettings", "block_size_override", "validation_nelbo"]

#: Seed offsets that separate the validation and search noise streams from the training stream.
VAL_SEED_OFFSET = 1_000_003
SEARCH_SEED_OFFSET = 2_000_003


@dataclass
class TrainSettings:
    """Hyper-parameters of :class:`BD3LMLit` (``configs/train.yaml``'s ``settings`` node). ``optimizer`` is called
    with the parameters (a partial, e.g. ``partial(torch.optim.AdamW, lr=3e-4)``)."""

    optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.0)
    warmup_steps: int = 2500
    lr_schedule: str = "constant"
    total_steps: int | None = None
    ema_decay: float | None = 0.9999
    schedule: str = "loglinear"
    seed: int = 1
    search_every: int = 1
    search_batches: int = 4
    clip_widths: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    var_min: bool = True
    cedd_weight: str = "one"
    log_dir: str | None = None
    init_eval: dict = field(default_factory=dict)


@contextmanager
def block_size_override(model: BD3LM, block_size: int) -> Iterator[BD3LM]:
    """Temporarily evaluate ``model`` at another block size (the weights do not depend on it)."""
    old = model.config.block_size
    if model.config.model_length % block_size:
        raise ValueError(f"block_size {block_size} does not divide model_length {model.config.model_length}")
    model.config.block_size = int(block_size)
    try:
        yield model
    finally:
        model.config.block_size = old


def _nelbo_sum(model: BD3LM, x0: Tensor, gen: torch.Generator, schedule: str) -> tuple[Tensor, int]:
    """Σ NELBO (float64) of a batch and the tokens it counts (AR predicts positions 1..L-1; so does a model
    trained with ``ignore_bos``)."""
    nll = nelbo(model, x0, generator=gen, schedule=schedule, ignore_first=bool(model.config.ignore_bos))
    length = x0.shape[1] - 1 if model.config.causal or model.config.ignore_bos else x0.shape[1]
    return nll.double().sum(), x0.shape[0] * length


@torch.no_grad()
def validation_nelbo(
    model: BD3LM, batches: Iterable[Tensor], *, seed: int, rank: int = 0, schedule: str = "loglinear"
) -> tuple[float, int]:
    """(Σ NELBO in nats, number of tokens) over ``batches`` with the validation noise of ``(seed, rank)``:
    exactly what :class:`BD3LMLit` logs as ``val/nll`` (sum / tokens) for the same batches and seed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = rank_generator(seed + VAL_SEED_OFFSET, rank, device=device)
    try:
        sums = [_nelbo_sum(model, x0.to(device), gen, schedule) for x0 in batches]
    finally:
        model.train(was_training)
    return float(sum(total for total, _ in sums)), sum(tokens for _, tokens in sums)


class BD3LMLit(L.LightningModule):
    """LightningModule around a :class:`~bd3lm.BD3LM` (any of BD3-LM / MDLM / AR), freshly initialised or
    warm-started with :func:`bd3lm.training.checkpoint.load_init_weights`."""

    def __init__(self, model: BD3LM, settings: TrainSettings | None = None) -> None:
        super().__init__()
        self.model = model
        self.settings = s = settings or TrainSettings()
        self.ema = EMA(model, s.ema_decay) if s.ema_decay else None
        self.noise_gen: torch.Generator | None = None
        self.batches_seen = 0  # micro-batches trained on (the data position)
        self.val_rounds = 0  # completed validation rounds during fit (not sanity checks)
        self.last_val_step = -1
        self.last_val: dict[str, float] = {}
        self._pending: dict | None = None  # states restored from a checkpoint, applied in on_train_start
        self._val_sum: Tensor | None = None
        self._val_tokens = 0
        self._search_data: list[Tensor] = []
        self.rank_info: dict = {}

    @property
    def searches(self) -> bool:
        """Whether this model runs the clipped-schedule search (var_min diffusion models only)."""
        return bool(self.settings.var_min) and hasattr(self.model, "sampling_eps_min") and not self.model.config.causal

    def interval(self) -> tuple[float, float]:
        """The current training clip interval [β, ω] (model buffers; the full range without them)."""
        m = self.model
        return (float(m.sampling_eps_min), float(m.sampling_eps_max)) if hasattr(m, "sampling_eps_min") else FULL_RANGE

    def set_interval(self, lo: float, hi: float) -> None:
        """Set the training interval (buffers and config, so that checkpoints and exports carry it)."""
        self.model.sampling_eps_min.fill_(float(lo))
        self.model.sampling_eps_max.fill_(float(hi))
        self.model.config.sampling_eps_min, self.model.config.sampling_eps_max = float(lo), float(hi)

    def configure_optimizers(self):
        s = self.settings
        opt = s.optimizer(self.model.parameters())
        if s.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {s.lr_schedule!r}")
        if s.lr_schedule == "cosine" and not s.total_steps:
            raise ValueError("lr_schedule 'cosine' needs total_steps (trainer.max_steps)")
        name = "cosine" if s.lr_schedule == "cosine" else "constant_with_warmup"
        sched = get_scheduler(name, opt, int(s.warmup_steps), int(s.total_steps or 0))  # (warm-up, total) steps
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _seed_streams(self, seed: int, dropout: bool = True) -> None:
        """This rank's noise generator and (``dropout``) global torch RNG, distinct per rank, from ``seed``."""
        rank = int(self.global_rank)
        self.noise_gen = rank_generator(seed, rank, device=self.device)
        if dropout:
            torch.manual_seed(rank_generator(seed + 17, rank).initial_seed())

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            self._shard_ema()
        self._seed_streams(int(self.settings.seed), dropout=self._pending is None)  # a resume restores them

    def on_train_start(self) -> None:
        if self._pending is not None:
            self._apply_pending()
        elif self.settings.init_eval:
            self._init_eval()
        self._record_rank_info()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        m, s = self.model, self.settings
        kw = {"cedd_weight": s.cedd_weight} if is_score_family(m) else {}
        kw.update(schedule=s.schedule, interval=self.interval(), generator=self.noise_gen)
        out = loss(m, batch, ignore_first=bool(m.config.ignore_bos), **kw)
        self.batches_seen += 1
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True)
        return out.loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    def on_exception(self, exception: BaseException) -> None:
        if self.ema is not None:
            self.ema.restore(self.model)

    def _fitting(self) -> bool:
        return self.trainer.state.fn == "fit" and not self.trainer.sanity_checking

    def _search_due(self) -> bool:
        every = int(self.settings.search_every or 0)
        return self.searches and every > 0 and self._fitting() and (self.val_rounds + 1) % every == 0

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None and not self.ema.is_swapped:
            self.ema.store(self.model)
        seed = int(self.settings.seed) + VAL_SEED_OFFSET
        self._val_gen = rank_generator(seed, int(self.global_rank), device=self.device)
        self._val_sum, self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        self._search_data = []

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        total, tokens = _nelbo_sum(self.model, batch, self._val_gen, self.settings.schedule)
        self._val_sum += total
        self._val_tokens += tokens
        if self._search_due() and len(self._search_data) < int(self.settings.search_batches):
            self._search_data.append(batch)

    def on_validation_epoch_end(self) -> None:
        try:
            totals = torch.stack([self._val_sum, self._val_sum.new_tensor(float(self._val_tokens))])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            nll = float(totals[0] / totals[1].clamp_min(1))
            metrics = {"val/nll": nll, "val/ppl": math.exp(min(nll, 700.0)), "val/bpd": nll / math.log(2)}
            for k, v in metrics.items():
                self.log(k, v, prog_bar=k == "val/ppl", sync_dist=False)
            if self._fitting():
                if self._search_due() and self._search_data:
                    self._run_search()
                self.val_rounds += 1
            if not self.trainer.sanity_checking:
                self.last_val_step = int(self.global_step)
                self.last_val = metrics
        finally:
            self._search_data = []
            if self.ema is not None:
                self.ema.restore(self.model)

    def _run_search(self) -> None:
        s = self.settings
        seed = int(s.seed) + SEARCH_SEED_OFFSET + self.val_rounds
        gen = rank_generator(seed, int(self.global_rank), device=self.device)
        cands = default_candidates(self.model.config.block_size, tuple(s.clip_widths))
        gather = self.all_gather if self.trainer.world_size > 1 else None
        res = clipped_schedule_search(
            self.model, self._search_data, candidates=cands, schedule=s.schedule, generator=gen, all_gather=gather
        )
        lo, hi = self.trainer.strategy.broadcast(tuple(map(float, res.best)), src=0)
        old = self.interval()
        self.set_interval(lo, hi)
        self.log_dict({"search/eps_min": lo, "search/eps_max": hi}, sync_dist=False)
        if self.trainer.is_global_zero:
            self._report_search(res.table, old, (lo, hi))

    def _report_search(self, table: list[dict], old: tuple[float, float], new: tuple[float, float]) -> None:
        rows = sorted(table, key=lambda r: r["variance"])
        if self.settings.log_dir:
            cols = [{"interval": list(r["interval"]), "variance": r["variance"], "mean": r["mean"]} for r in table]
            rec = {"step": int(self.global_step), "previous": list(old), "best": list(new), "table": cols}
            with open(Path(self.settings.log_dir) / "clip_search.jsonl", "a") as f:
                f.write(dumps(rec) + "\n")
        top = ", ".join(f"[{r['interval'][0]:.3g},{r['interval'][1]:.3g}] var {r['variance']:.4g}" for r in rows[:3])
        full = next((r for r in table if tuple(r["interval"]) == FULL_RANGE), None)
        ref = f"; full range var {full['variance']:.4g}" if full else ""
        change = f"interval {old[0]:.3g}-{old[1]:.3g} -> {new[0]:.3g}-{new[1]:.3g}"
        print(f"[clip search @ step {self.global_step}] {change} (best: {top}{ref})", flush=True)

    def _init_eval(self) -> None:
        """Warm start, before the first step: NELBO of the initial weights at the new and the source L'."""
        info, s, metrics = dict(self.settings.init_eval), self.settings, {}
        loader, limit = self.trainer.datamodule.val_dataloader(), self.trainer.limit_val_batches
        batches = list(islice(loader, len(loader) if isinstance(limit, float) else min(len(loader), int(limit))))
        sizes = {"init/val_nll": self.model.config.block_size}
        if info.get("source_block_size"):
            sizes["init/val_nll_source"] = int(info["source_block_size"])
        with self.ema.swapped(self.model) if self.ema is not None else nullcontext():
            for name, bs in sizes.items():
                with block_size_override(self.model, bs):
                    total, tokens = validation_nelbo(
                        self.model, batches, seed=int(s.seed), rank=int(self.global_rank), schedule=s.schedule
                    )
                t = torch.tensor([total, float(tokens)], dtype=torch.float64, device=self.device)
                t = self.trainer.strategy.reduce(t, reduce_op="sum")
                metrics[name] = float(t[0] / t[1])
        for lg in self.loggers:
            lg.log_metrics(metrics, step=0)
        if self.trainer.is_global_zero:
            parts = ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items())
            print(f"[init] warm start from {info.get('path')}: {parts} nats/token", flush=True)

    def _gather_states(self, state: Tensor) -> list[Tensor]:
        """Per-rank copies of a uint8 state tensor (every rank's RNG must be saved for an exact resume)."""
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return [state]
        out = [torch.empty_like(state) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(out, state)
        return out

    def _fsdp(self) -> FSDPStrategy | None:
        """Lightning's ``FSDPStrategy`` when it shards the weights, else None: the EMA's one GPU-only branch."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, FSDPStrategy) else None

    def _shard_ema(self) -> None:
        """Under FSDP, make this rank's shards of the full shadow (from ``__init__`` or a checkpoint) the shadow.
        A collective: FSDP calls ``on_fit_start`` and ``on_load_checkpoint`` on every rank, after wrapping."""
        fsdp = self._fsdp()
        if self.ema is None or fsdp is None or self.ema.sharded:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        def load_full(full: dict[str, Tensor]) -> None:
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(fsdp.model, {f"model.{k}": v for k, v in full.items()}, options=opts)

        scatter_shadow(self.ema, self.model, dict(self.ema.shadow), load_full)

    def ema_state_dict(self) -> dict | None:
        """The EMA state with the full shadow (as checkpoints and exports hold it; None without EMA). Under FSDP
        a collective (every rank must call it) whose full shadow lands on global rank 0 only (others get ``{}``)."""
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        fsdp = self._fsdp()
        if fsdp is not None and self.ema.sharded:

            def gather_full() -> dict[str, Tensor]:
                full = fsdp.lightning_module_state_dict()
                return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}

            state["shadow"] = gather_shadow(self.ema, self.model, gather_full)
        return state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        noise = self.noise_gen.get_state() if self.noise_gen is not None else torch.empty(0, dtype=torch.uint8)
        checkpoint["bd3lm"] = {
            "ema": self.ema_state_dict(),
            "noise_gen": self._gather_states(noise),
            "torch_rng": self._gather_states(torch.get_rng_state()),
            "rng": rng_state(),
            "batches_seen": int(self.batches_seen),
            "val_rounds": int(self.val_rounds),
            "last_val_step": int(self.last_val_step),
            "last_val": dict(self.last_val),
            "interval": list(self.interval()),
            "world_size": int(self.trainer.world_size),
        }
        checkpoint["bd3lm_config"] = self.model.config.to_dict()
        for lg in self.loggers:  # metrics up to the checkpoint survive a crash right after it
            lg.save()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if (state := checkpoint.get("bd3lm")) is None:
            raise ValueError("checkpoint has no bd3lm training state (not written by this trainer)")
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("checkpoint has no EMA state but EMA is enabled (ema.decay)")
            self.ema.load_state_dict(state["ema"])
            self._shard_ema()
        self.batches_seen = int(state["batches_seen"])
        if self.batches_seen and "ChunkDataModule" not in checkpoint:  # written before the token-shard pipeline
            raise Refused("checkpoint has no data position (it predates the token-shard data pipeline and its "
                          "validation rule): resuming would restart the data; start a new run_dir (init_from= it)")
        self.val_rounds = int(state["val_rounds"])
        self.last_val_step = int(state.get("last_val_step", -1))
        self.last_val = dict(state.get("last_val", {}))
        self._pending = state

    def _apply_pending(self) -> None:
        state, self._pending = self._pending, None
        rank, same_world = int(self.global_rank), int(state.get("world_size", 1)) == int(self.trainer.world_size)
        if same_world and len(state["noise_gen"]) > rank and state["noise_gen"][rank].numel():
            self.noise_gen.set_state(state["noise_gen"][rank].cpu())
            torch.set_rng_state(state["torch_rng"][rank].cpu())
            if rank == 0:
                set_rng_state(state["rng"])
        else:  # a different world size cannot be resumed bit-exactly: derive fresh per-rank streams
            self._seed_streams(int(self.settings.seed) + self.batches_seen)

    def _record_rank_info(self) -> None:
        """Record this rank's noise-stream identity (hash of its first draw) in ``log_dir/ranks``."""
        if not self.settings.log_dir or self.noise_gen is None:
            return
        probe = torch.Generator(device=self.noise_gen.device)
        probe.set_state(self.noise_gen.get_state())
        first = torch.rand(16, generator=probe, device=self.noise_gen.device, dtype=torch.float64)
        digest = hashlib.sha256(first.cpu().numpy().tobytes()).hexdigest()[:16]
        rank, world, step = int(self.global_rank), int(self.trainer.world_size), int(self.global_step)
        self.rank_info = {"rank": rank, "world_size": world, "step": step, "noise_first_draw_sha256": digest}
        out = Path(self.settings.log_dir) / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(dumps(self.rank_info) + "\n")
