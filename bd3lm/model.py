"""The BD3-LM transformer: a DiT backbone (Peebles & Xie 2023, as used by MDLM and BD3-LM) as a Hugging Face model.

State-dict keys, shapes and config fields are those of the official release, so ``BD3LM.from_pretrained`` loads
an official Hub directory without remote code and ``save_pretrained`` writes one the official code can load.

Forward contract (Arriola et al. 2025, §3.2):

- ``model(input_ids=cat([x_t, x_0], 1))`` with length ``2L`` (``L = model_length``) is the vectorised training
  pass under ``M_BD ∪ M_OBC ∪ M_BC``; ``out.logits`` holds raw logits of the x_t half only, shape (B, L, V).
  The output head never runs on the clean half and the last layer computes queries for the x_t half only.
- a plain input of length ``≤ L`` is the sampling pass under the block-causal mask (causal for AR models);
- with ``kv_cache=`` the input is the newest tokens only: their queries attend to the cached clean prefix and
  to themselves (block-causally), and their keys/values are written into the cache (see :mod:`bd3lm.cache`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from bd3lm.cache import KVCache
from bd3lm.checkpoint import check_checkpoint_dir
from bd3lm.kernels import StructuredMask, attention, resolve_backend


class BD3LMConfig(PretrainedConfig):
    """Configuration with the official field names.

    ``block_size`` L' must divide ``model_length`` L. ``block_size = 1`` with ``cross_attn`` is BD3-LM's
    autoregressive limit, ``block_size = model_length`` is MDLM; ``causal=True`` (with ``adaln=False``,
    ``cross_attn=False``) is a plain autoregressive transformer. ``mask_token_id`` defaults to
    ``vocab_size - 1`` (the official convention: the mask is appended to the tokenizer's vocabulary).
    ``attn_backend=None`` chooses automatically (see :func:`bd3lm.kernels.resolve_backend`).
    ``ignore_bos`` (not an official field): the model was trained with position 0 clean and not in the loss (the
    official ``algo.ignore_bos``); :func:`bd3lm.evaluation.likelihood` then leaves it out of the bound too.
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
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


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32 (eps 1e-5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # no autocast to leave (the context costs per call)
            return (F.layer_norm(x.float(), (self.dim,)) * self.weight.float()).to(self.weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,)) * self.weight.float()


def affine_norm(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """:class:`LayerNorm` with a float32 ``weight`` and ``bias`` (the folded adaLN modulation), same dtypes."""
    if not torch.is_autocast_enabled(x.device.type):
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias).to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias)


class Folded(NamedTuple):
    """A transformer block's affine maps with a constant conditioning folded in (see :meth:`DDiTBlock.fold`)."""

    ln1_w: Tensor
    ln1_b: Tensor | None
    out_w: Tensor
    ln2_w: Tensor
    ln2_b: Tensor | None
    fc2_w: Tensor
    fc2_b: Tensor


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift``."""
    return x * (1 + scale) + shift


class Rotary(nn.Module):
    """Rotary position embedding, GPT-NeoX "rotate-half" convention, base 10000, over the full head size."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin of shape (..., N, 1, head_dim) for integer ``positions`` (N,) or (B, N); angles in float64."""
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().float().unsqueeze(-2), emb.sin().float().unsqueeze(-2)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x cos + rotate_half(x) sin`` for x (B, N, H, D)."""
    if cos.dim() == 3:  # shared positions (N, 1, D)
        cos, sin = cos[None], sin[None]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of σ (256 frequencies, max period 1e4) → Linear → SiLU → Linear."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    """Token embedding as a raw (V, d) matrix (not tied to the output head)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]


class DDiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-zero modulation (six vectors: shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, adaln: bool):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: Tensor,
        c: Tensor | None,
        rotary: tuple[Tensor, Tensor],
        mask,
        backend: str,
        n_keep: int | Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        if self.adaln:
            mods = self.modulations(c)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        else:
            h = self.norm1(x)
        x, a = self._attend(x, h, rotary, mask, backend, n_keep, cache, layer)
        a = self.dropout(self.attn_out(a))
        if self.adaln:
            x = x + gate_msa * a
            m = self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
            return x + gate_mlp * m
        x = x + a
        return x + self.dropout(self.mlp(self.norm2(x)))

    def _attend(self, x, h, rotary, mask, backend, n_keep, cache, layer) -> tuple[Tensor, Tensor]:
        """Multi-head attention of the normalised input ``h`` (rotary on q and k); returns the residual stream
        (restricted to the kept queries) and the heads' concatenated output before the output projection."""
        b, n, d = h.shape
        qkv = self.attn_qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads)
        cos, sin = rotary
        q = apply_rotary(qkv[:, :, 0], cos, sin)
        k = apply_rotary(qkv[:, :, 1], cos, sin)
        v = qkv[:, :, 2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if isinstance(n_keep, Tensor):  # cached last layer: only the queries whose logits are asked for
            q = q.gather(2, n_keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
            x = x.gather(1, n_keep[:, :, None].expand(-1, -1, d))
            if isinstance(mask, Tensor):
                mask = mask.expand(b, -1, -1, -1).gather(2, n_keep[:, None, :, None].expand(-1, 1, -1, mask.shape[3]))
        elif n_keep is not None and n_keep < n:  # the clean half's outputs are not needed after the last layer
            q, x = q[:, :, :n_keep], x[:, :n_keep]
        return x, attention(q, k, v, mask, backend).transpose(1, 2).reshape(b, q.shape[2], d)

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """The six adaLN vectors (shift, scale, gate for attention and MLP), each (B or 1, 1, d)."""
        return self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)

    def fold(self, c: Tensor | None) -> Folded:
        """This block with the constant conditioning ``c`` (one row) folded into its affine maps, for inference:
        ``LN(x) w (1 + scale) + shift`` is a LayerNorm with weight ``w (1 + scale)`` and bias ``shift``, and
        ``gate * (W a + b)`` is ``(gate ⊙ W) a + gate ⊙ b`` (Peebles & Xie 2023, adaLN-zero, §3.2)."""
        w1, w2 = self.norm1.weight.float(), self.norm2.weight.float()
        out_w, fc2 = self.attn_out.weight, self.mlp[2]
        if not self.adaln:
            return Folded(w1, None, out_w, w2, None, fc2.weight, fc2.bias)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.reshape(-1).float() for m in self.modulations(c))
        return Folded(
            w1 * (1 + scale1), shift1, (out_w.float() * gate1[:, None]).to(out_w.dtype),
            w2 * (1 + scale2), shift2, (fc2.weight.float() * gate2[:, None]).to(fc2.weight.dtype),
            (fc2.bias.float() * gate2).to(fc2.bias.dtype),
        )

    def forward_folded(self, x: Tensor, f: Folded, rotary, mask, backend: str, cache: KVCache | None,
                       layer: int, keep: Tensor | None = None) -> Tensor:
        """:meth:`forward` in eval mode with the folded maps ``f`` (same function, fewer operations); ``keep``
        (B, k): return only these positions (their keys/values are all written to ``cache`` first)."""
        x, a = self._attend(x, affine_norm(x, f.ln1_w, f.ln1_b, self.norm1.weight.dtype), rotary, mask, backend,
                            keep, cache, layer)
        x = x + F.linear(a, f.out_w)
        h = self.mlp[1](self.mlp[0](affine_norm(x, f.ln2_w, f.ln2_b, self.norm2.weight.dtype)))
        return x + F.linear(h, f.fc2_w, f.fc2_b)


class DDitFinalLayer(nn.Module):
    """LayerNorm → adaLN (shift, scale) → Linear(d → V) with bias; zero-initialised."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int, adaln: bool):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor | None, folded: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """x (B, N, d) with c (B or 1, cond), or gathered rows x (M, d) with c (M or 1, cond); ``folded`` = the
        output of :meth:`fold` for a constant ``c``."""
        if folded is not None:
            return self.linear(affine_norm(x, *folded, self.norm_final.weight.dtype))
        h = self.norm_final(x)
        if self.adaln:
            mod = self.adaLN_modulation(c)
            shift, scale = (mod[:, None, :] if x.dim() == 3 else mod).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h)

    def fold(self, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """LayerNorm weight and bias with the constant conditioning ``c`` (one row) folded in (as
        :meth:`DDiTBlock.fold`)."""
        w = self.norm_final.weight.float()
        if not self.adaln:
            return w, None
        shift, scale = self.adaLN_modulation(c).reshape(-1).float().chunk(2)
        return w * (1 + scale), shift


class DITBackbone(nn.Module):
    """Embedding, optional σ-MLP, rotary, ``n_blocks`` DiT blocks and the output layer (official module names)."""

    def __init__(self, config: BD3LMConfig):
        super().__init__()
        d, adaln = config.hidden_dim, config.use_adaln
        self.vocab_embed = EmbeddingLayer(d, config.vocab_size)
        if adaln:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(d // config.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(d, config.n_heads, config.cond_dim, config.dropout, adaln) for _ in range(config.n_blocks)
        )
        self.output_layer = DDitFinalLayer(d, config.vocab_size, config.cond_dim, adaln)
        self.adaln = adaln

    def conditioning(self, sigma: Tensor | None, batch: int, device: torch.device, time_conditioning: bool):
        """c = SiLU(MLP(emb(σ))); without time conditioning σ ≡ 0 and c is one constant row (broadcast)."""
        if not self.adaln:
            return None
        if time_conditioning and sigma is not None:
            sigma = sigma.reshape(-1)
            if sigma.numel() != batch:
                raise ValueError(f"timesteps must have shape ({batch},); got {tuple(sigma.shape)}")
        else:
            sigma = torch.zeros(1, device=device)
        return F.silu(self.sigma_map(sigma))


class BD3LM(PreTrainedModel):
    """Block discrete diffusion LM (and its AR / MDLM limits) with the official checkpoint layout."""

    config_class = BD3LMConfig
    base_model_prefix = "bd3lm"
    main_input_name = "input_ids"
    _no_split_modules = ["DDiTBlock"]
    _supports_sdpa = True

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        self.backbone = DITBackbone(config)
        if config.var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(float(config.sampling_eps_min)))
            self.register_buffer("sampling_eps_max", torch.tensor(float(config.sampling_eps_max)))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """Load a directory in the official layout (no remote code); local directories are checked first.

        ``strict`` (default): a missing or unexpected weight is an error, never a silently random tensor.
        """
        path = pretrained_model_name_or_path
        local = os.path.isdir(os.fspath(path)) or os.path.sep in os.fspath(path) or os.fspath(path).startswith(".")
        if local:
            check_checkpoint_dir(path)
        kwargs.setdefault("output_loading_info", False)
        want_info = kwargs.pop("output_loading_info")
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
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
            timesteps: optional (B,) σ values; used only when ``config.time_conditioning``.
            two_stream: force (True) or forbid (False) the two-stream pass; ``None`` infers it from
                ``N == 2 * model_length`` on cross-attention models.
            kv_cache: cached mode; ``positions`` (B, N) rotary positions of the new tokens are then required, and
                ``attention_mask`` is a (B, N_new, N_cache + N) boolean mask (True = attend) or ``None`` (every
                query attends every cached and new key). In eval mode without a time input the conditioning is
                constant, so it is folded into the blocks' affine maps once (:meth:`DDiTBlock.fold`) and kept in
                ``kv_cache.constants``.
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
        """
        if validate_ids:
            self._check_ids(input_ids)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 = all positions); got {logits_to_keep!r}")
        cfg = self.config
        bsz, n_in = input_ids.shape
        L = cfg.model_length
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
            c = bb.conditioning(timesteps, bsz, input_ids.device, cfg.time_conditioning)
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
        if logits_mask is not None:
            if logits_mask.shape != x.shape[:2]:
                raise ValueError(f"logits_mask must have shape {tuple(x.shape[:2])}; got {tuple(logits_mask.shape)}")
            rows = logits_mask.nonzero(as_tuple=True)
            x = x[rows]
            if c is not None and c.shape[0] > 1:
                c = c[rows[0]]
        elif kv_cache is not None and out_index is not None:
            pass  # the last layer returned the kept positions only
        elif logits_index is not None:
            x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))
        elif logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
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


AutoConfig.register("bd3lm", BD3LMConfig)
AutoModel.register(BD3LMConfig, BD3LM)
AutoModelForMaskedLM.register(BD3LMConfig, BD3LM)
