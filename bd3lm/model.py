"""The BD3-LM transformer: a DiT backbone (Peebles & Xie 2023, as used by MDLM and BD3-LM; :mod:`bd3lm.dit`) as a
Hugging Face model.

State-dict keys, shapes and config fields are those of the official release, so ``BD3LM.from_pretrained`` loads
an official Hub directory without remote code and ``save_pretrained`` writes one the official code can load.

Forward contract (Arriola et al. 2025, §3.2):

- ``model(input_ids=cat([x_t, x_0], 1))`` with length ``2L`` (``L = model_length``) is the vectorised training
  pass under ``M_BD ∪ M_OBC ∪ M_BC``; ``out.logits`` holds raw logits of the x_t half only, shape (B, L, V).
  The output head never runs on the clean half and the last layer computes queries for the x_t half only.
- a plain input of length ``≤ L`` is the sampling pass under the block-causal mask (causal for AR models);
- with ``kv_cache=`` the input is the newest tokens only: their queries attend to the cached clean prefix and
  to themselves (block-causally), and their keys/values are written into the cache (see :mod:`bd3lm.cache`).

Time conditioning (``config.time_conditioning``): ``timesteps`` is one σ per sequence (B,) or one σ per input
token (B, N). Block diffusion has one noise level per block (Arriola et al. 2025, §3.2), so a time-conditioned
two-stream pass gets the σ of each token's block on the x_t half and σ = 0 on the clean x_0 half, and a cached
call gets 0 on the clean prefix it feeds and the noisy block's σ on that block.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from bd3lm.cache import KVCache
from bd3lm.checkpoint import check_checkpoint_dir, check_weights, expected_shapes
from bd3lm.dit import DITBackbone, check_timesteps, keep_rows
from bd3lm.graphs import check_family
from bd3lm.kernels import StructuredMask, resolve_backend


class BD3LMConfig(PretrainedConfig):
    """Configuration with the official field names.

    ``block_size`` L' must divide ``model_length`` L. ``block_size = 1`` with ``cross_attn`` is BD3-LM's
    autoregressive limit, ``block_size = model_length`` is MDLM; ``causal=True`` (with ``adaln=False``,
    ``cross_attn=False``) is a plain autoregressive transformer. ``mask_token_id`` defaults to
    ``vocab_size - 1`` (the official convention: the mask is appended to the tokenizer's vocabulary).
    ``attn_backend=None`` chooses automatically (see :func:`bd3lm.kernels.resolve_backend`).
    ``ignore_bos`` (not an official field): the model was trained with position 0 clean and not in the loss (the
    official ``algo.ignore_bos``); :func:`bd3lm.evaluation.likelihood` then leaves it out of the bound too.
    ``graph`` / ``loss`` / ``p_m`` / ``noise_schedule`` (not official fields; the defaults are the official
    model's): the forward process (:mod:`bd3lm.graphs`: absorbing, uniform, roulette with ``p_m``), what the
    output means and how it was trained (``subs`` = MDLM/BD3-LM logits, ``score_entropy`` = SEDD log-scores,
    ``cedd`` = clean-token logits trained by cross-entropy; :mod:`bd3lm.score_objectives`) and the noise schedule
    the samplers use by default.
    """

    model_type = "bd3lm"

    block_size: int = 1
    vocab_size: int = 50258
    model_length: int = 1024
    cross_attn: bool = True
    adaln: bool = True
    attn_backend: str | None = None
    causal: bool = False
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    var_min: bool = True
    sampling_eps_min: float = 1e-3
    sampling_eps_max: float = 0.999
    mask_token_id: int | None = None
    ignore_bos: bool = False
    graph: str = "absorbing"
    loss: str = "subs"
    p_m: float | None = None
    noise_schedule: str = "loglinear"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_family(self.graph, self.loss, self.p_m)
        for name in ("block_size", "vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.model_length % self.block_size != 0:
            raise ValueError(
                f"block_size {self.block_size} does not divide model_length {self.model_length}; "
                "expected model_length to be a multiple of block_size"
            )
        if self.hidden_dim % self.n_heads != 0 or (self.hidden_dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} must be a multiple of n_heads {self.n_heads} with an even head size"
            )
        if self.attn_backend not in (None, "auto", "sdpa", "flex", "flash_attn", "reference"):
            raise ValueError(
                f"unknown attn_backend {self.attn_backend!r}; expected sdpa, flex, flash_attn, reference or None"
            )
        if self.causal and self.cross_attn:
            raise ValueError("causal=True (autoregressive) cannot be combined with cross_attn=True (two-stream)")
        mask = self.mask_index
        if not 0 <= mask < self.vocab_size:
            raise ValueError(f"mask_token_id {mask} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def mask_index(self) -> int:
        """The id of the mask token ``m``."""
        return self.vocab_size - 1 if self.mask_token_id is None else int(self.mask_token_id)

    @property
    def use_adaln(self) -> bool:
        """adaLN exists for every non-causal model (official rule ``not causal or adaln``)."""
        return (not self.causal) or bool(self.adaln)


@dataclass
class BD3LMOutput(ModelOutput):
    """``logits``: raw logits (B, N, V) of the query tokens (the x_t half in the two-stream pass)."""

    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class BD3LM(PreTrainedModel):
    """Block discrete diffusion LM (and its AR / MDLM limits) with the official checkpoint layout."""

    config_class = BD3LMConfig
    base_model_prefix = "bd3lm"
    main_input_name = "input_ids"
    _no_split_modules = ["DDiTBlock"]
    _supports_sdpa = True
    #: forward takes no loss kwargs (no ``labels``): the HF Trainer must not pass ``num_items_in_batch``.
    accepts_loss_kwargs = False

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        self.backbone = DITBackbone(config)
        if config.var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(float(config.sampling_eps_min)))
            self.register_buffer("sampling_eps_max", torch.tensor(float(config.sampling_eps_max)))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """Load a checkpoint in the official layout (no remote code): a local directory, else a Hub model id.

        The name is resolved by :func:`bd3lm.hub.resolve_model_dir` (an existing local directory first, then the
        Hugging Face cache, downloading only when not offline; ``revision``, ``cache_dir``, ``local_files_only``
        and ``token`` apply to that). The weight files are then checked (:func:`bd3lm.checkpoint.check_weights`):
        corrupted or truncated bytes, a shape the config does not expect, or a NaN/inf weight is a one-line
        ``ValueError`` naming the file. ``strict`` (default): a missing or unexpected weight is an error, never a
        silently random tensor.
        """
        from bd3lm.hub import resolve_model_dir

        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        path = resolve_model_dir(pretrained_model_name_or_path, **hub)
        check_checkpoint_dir(path)
        shapes = None if kwargs.get("ignore_mismatched_sizes") else expected_shapes(cls, path, kwargs)
        check_weights(path, shapes)
        kwargs.setdefault("output_loading_info", False)
        want_info = kwargs.pop("output_loading_info")
        model, info = super().from_pretrained(os.fspath(path), *args, output_loading_info=True, **kwargs)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if strict and problems:
            detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
            raise ValueError(f"checkpoint {os.fspath(path)!r} does not match the BD3LM config: {detail}")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write config.json + model.safetensors in the official layout.

        ``attn_backend=None`` (automatic) is written as ``"sdpa"``, a value the official code understands.
        """
        auto = self.config.attn_backend in (None, "auto")
        if auto:
            self.config.attn_backend = "sdpa"
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if auto:
                self.config.attn_backend = None

    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation is done by the modules themselves (kaiming embedding, zero adaLN and head)."""

    @property
    def mask_index(self) -> int:
        return self.config.mask_index

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def attn_backend(self, device: torch.device) -> str:
        grad = torch.is_grad_enabled() and self.training
        return resolve_backend(self.config.attn_backend, device, grad=grad)

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a (batch, length) tensor of token ids; got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids (int64 or int32); got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length); got {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            hi, lo = int(input_ids.max()), int(input_ids.min())
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None = None,
        *,
        two_stream: bool | None = None,
        kv_cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        logits_mask: Tensor | None = None,
        output_all: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        logits_index: Tensor | None = None,
        validate_ids: bool = True,
        **kwargs,
    ) -> BD3LMOutput:
        """Run the network; see the module docstring for the three modes.

        Args:
            input_ids: (B, N) token ids.
            timesteps: optional σ values, one per sequence (B,) or one per input token (B, N) (e.g. each block's σ
                on the x_t half and 0 on the clean half of a two-stream input); used only when
                ``config.time_conditioning``. Per-token σ in the cached mode runs the unfolded blocks.
            two_stream: force (True) or forbid (False) the two-stream pass; ``None`` infers it from
                ``N == 2 * model_length`` on cross-attention models.
            kv_cache: cached mode; ``positions`` (B, N) rotary positions of the new tokens are then required, and
                ``attention_mask`` is a (B, N_new, N_cache + N) boolean mask (True = attend) or ``None`` (every
                query attends every cached and new key). In eval mode without a time input the conditioning is
                constant, so it is folded into the blocks' affine maps once (:meth:`bd3lm.dit.DDiTBlock.fold`)
                and kept in ``kv_cache.constants``.
            positions: rotary positions for the plain pass (default ``0..N-1``).
            logits_mask: optional (B, N_out) boolean; the output head then runs only on the selected rows and
                ``logits`` is (M, V) in row-major order (the masked-token loss needs no other row).
            output_all: two-stream pass only: also compute the clean half's outputs, logits (B, 2n, V), as the
                official code does (for benchmarks and checks; training never needs them).
            logits_to_keep: if > 0, run the output head on the last ``logits_to_keep`` positions only (the
                Hugging Face convention); logits are then (B, logits_to_keep, V).
            logits_index: optional (B, k) positions (per row) whose logits to return, (B, k, V). In the cached
                mode both options also restrict the last layer's queries to those positions (the others' outputs
                are never read; every position's keys/values are still cached).
            validate_ids: check that every id lies in the vocabulary (a device sync); a caller that checked its
                inputs once (the sampler) turns it off for its inner calls.
            **kwargs: only ``return_dict`` (the Hugging Face convention; ignored: the output is always a
                :class:`BD3LMOutput`, which also indexes like a tuple). Any other name is a one-line ``TypeError``
                listing the accepted arguments, so a typo never silently does nothing.
        """
        if kwargs:
            _reject_kwargs(kwargs)
        if validate_ids:
            self._check_ids(input_ids)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 = all positions); got {logits_to_keep!r}")
        cfg = self.config
        bsz, n_in = input_ids.shape
        L = cfg.model_length
        if timesteps is not None:
            check_timesteps(timesteps, bsz, n_in)
        if kv_cache is not None:
            if positions is None:
                raise ValueError("the cached forward needs positions (B, N) of the new tokens")
            mask = None if attention_mask is None else attention_mask[:, None]
            n_keep, backend = None, "sdpa" if cfg.attn_backend != "reference" else "reference"
        else:
            if two_stream is None:
                two_stream = cfg.cross_attn and n_in == 2 * L
            if two_stream:
                if not cfg.cross_attn:
                    raise ValueError("two_stream=True needs a cross_attn model (causal AR models read x_0 only)")
                if n_in % 2:
                    raise ValueError(f"a two-stream input must have even length 2n; got {n_in}")
                n = n_in // 2
                if n % cfg.block_size:
                    raise ValueError(
                        f"sequence length {n} is not a multiple of block_size {cfg.block_size}"
                    )
                if n > L:
                    raise ValueError(f"two-stream input length {n_in} exceeds 2 * model_length = {2 * L}")
                ar = torch.arange(n, device=input_ids.device)
                positions = torch.cat([ar, ar]) if positions is None else positions
                mask = StructuredMask("two_stream", n, cfg.block_size, 2 * n)
                n_keep = None if output_all else n
            else:
                if n_in > L:
                    raise ValueError(
                        f"input length {n_in} is neither <= model_length {L} (sampling pass) "
                        f"nor 2 * model_length = {2 * L} (two-stream pass)"
                    )
                positions = torch.arange(n_in, device=input_ids.device) if positions is None else positions
                bs = 1 if cfg.causal else cfg.block_size
                mask = StructuredMask("full" if bs >= n_in else "block_causal", n_in, bs, n_in)
                if attention_mask is not None:
                    dense = mask.dense(input_ids.device)
                    am = attention_mask.bool()
                    if am.dim() == 2:  # key padding (B, N); queries always see themselves to avoid empty rows
                        am = am[:, None, :] | torch.eye(n_in, dtype=torch.bool, device=am.device)[None]
                    mask = (am if dense is None else am & dense)[:, None]
                n_keep = None
            backend = self.attn_backend(input_ids.device)
            if isinstance(mask, Tensor) and backend in ("flex", "flash_attn"):  # padding needs a dense mask
                backend = "sdpa"

        bb = self.backbone
        x = bb.vocab_embed(input_ids)
        out_index = logits_index
        if out_index is None and logits_to_keep > 0 and kv_cache is not None and logits_to_keep < n_in:
            out_index = torch.arange(n_in - logits_to_keep, n_in, device=input_ids.device).expand(bsz, -1)
        folded: list | None = None
        if kv_cache is not None and not self.training and (timesteps is None or not cfg.time_conditioning):
            folded = kv_cache.constants.get("folded")  # type: ignore[assignment]
            if folded is None:
                c = bb.conditioning(None, 1, input_ids.device, cfg.time_conditioning)
                folded = [blk.fold(c) for blk in bb.blocks] + [bb.output_layer.fold(c)]
                kv_cache.constants["folded"] = folded
            c = None
        else:
            c = bb.conditioning(timesteps, bsz, input_ids.device, cfg.time_conditioning, n_in)
        rotary = bb.rotary_emb.cos_sin(positions)
        hidden = [x] if output_hidden_states else None
        last = len(bb.blocks) - 1
        for i, block in enumerate(bb.blocks):
            keep, layer_mask = None, mask
            if i == last and n_keep is not None:  # queries of the x_t half only
                keep = n_keep
                layer_mask = StructuredMask(mask.kind, mask.n, mask.block_size, n_keep)
            if kv_cache is not None and i == last:
                keep = out_index
            if folded is not None:
                x = block.forward_folded(x, folded[i], rotary, layer_mask, backend, kv_cache, i, keep)
            else:
                x = block(x, c, rotary, layer_mask, backend, n_keep=keep, cache=kv_cache, layer=i)
            if hidden is not None:
                hidden.append(x)
        # a per-token c (B, N, cond) follows every row restriction of x; a per-sequence one (B or 1, cond) is kept
        c = keep_rows(c, out_index if kv_cache is not None else n_keep)
        if logits_mask is not None:
            if logits_mask.shape != x.shape[:2]:
                raise ValueError(f"logits_mask must have shape {tuple(x.shape[:2])}; got {tuple(logits_mask.shape)}")
            rows = logits_mask.nonzero(as_tuple=True)
            x = x[rows]
            if c is not None and c.dim() == 3:
                c = c.expand(-1, logits_mask.shape[1], -1)[rows]
            elif c is not None and c.shape[0] > 1:
                c = c[rows[0]]
        elif kv_cache is not None and out_index is not None:
            pass  # the last layer returned the kept positions only
        elif logits_index is not None:
            x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))
            c = keep_rows(c, logits_index)
        elif logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
            c = c if c is None or c.dim() == 2 else c[:, -logits_to_keep:]
        logits = bb.output_layer(x, c, None if folded is None else folded[-1])
        return BD3LMOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)

    def new_cache(self, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences and ``capacity`` positions (default L), stored in
        ``dtype`` (default: the dtype of the first keys written, i.e. the compute dtype)."""
        cfg = self.config
        p = self.backbone.vocab_embed.embedding
        return KVCache(
            n_layers=cfg.n_blocks,
            batch_size=batch_size,
            n_heads=cfg.n_heads,
            head_dim=cfg.hidden_dim // cfg.n_heads,
            capacity=capacity or cfg.model_length,
            dtype=dtype,
            device=p.device,
        )


#: Keyword arguments forward accepts besides its own: Hugging Face conventions that change nothing here.
IGNORED_FORWARD_KWARGS = frozenset({"return_dict"})
#: Arguments of the official code's forward that this implementation spells differently.
_OFFICIAL_HINTS = {
    "sample_mode": "sampling is bd3lm.generate; a plain input of length <= model_length is the sampling pass",
    "store_kv": "the cached forward takes kv_cache=model.new_cache(...) and positions=",
}


def forward_arguments() -> tuple[str, ...]:
    """The keyword arguments :meth:`BD3LM.forward` accepts (its parameters and :data:`IGNORED_FORWARD_KWARGS`)."""
    names = [p for p in inspect.signature(BD3LM.forward).parameters if p not in ("self", "kwargs")]
    return tuple(names) + tuple(sorted(IGNORED_FORWARD_KWARGS))


def _reject_kwargs(kwargs: dict) -> None:
    unknown = sorted(k for k in kwargs if k not in IGNORED_FORWARD_KWARGS)
    if unknown:
        hints = "".join(f" ({k}: {_OFFICIAL_HINTS[k]})" for k in unknown if k in _OFFICIAL_HINTS)
        raise TypeError(
            f"BD3LM.forward() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}{hints}; "
            f"accepted: {', '.join(forward_arguments())}"
        )


AutoConfig.register("bd3lm", BD3LMConfig)
AutoModel.register(BD3LMConfig, BD3LM)
AutoModelForMaskedLM.register(BD3LMConfig, BD3LM)
