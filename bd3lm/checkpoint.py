"""Checkpoint directories in the official Hugging Face layout (config.json + model.safetensors).

``BD3LM.from_pretrained`` / ``save_pretrained`` do the work; this module checks a local directory first so a
missing file is one clear line, checks the weight files themselves (:func:`check_weights`: corrupted or truncated
bytes, shapes the config does not expect, NaN/inf values) so a damaged checkpoint is refused instead of loaded,
and lists the official state-dict keys (for tests and for strict imports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_checkpoint_dir(path: str | os.PathLike) -> None:
    """Raise a one-line ``FileNotFoundError`` unless ``path`` holds config.json and safetensors weights."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"checkpoint directory {path!r} has no config.json (expected the Hugging Face layout)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise FileNotFoundError(
            f"checkpoint directory {path!r} has no model.safetensors (expected safetensors weights; "
            "pickled .bin/.ckpt files are not loaded)"
        )


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of checkpoint directory ``path``: ``model.safetensors``, else the shards listed by
    ``model.safetensors.index.json`` (a one-line ``ValueError`` / ``FileNotFoundError`` for a broken index)."""
    path = Path(path)
    single = path / WEIGHT_FILES[0]
    if single.is_file():
        return [single]
    index = path / WEIGHT_FILES[1]
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"checkpoint index {os.fspath(index)!r} is not a valid JSON index ({err})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"checkpoint index {os.fspath(index)!r} has no weight_map (expected tensor name -> shard)")
    shards = sorted({path / str(v) for v in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"checkpoint shard {os.fspath(shard)!r} listed in {index.name} does not exist")
    return shards


def check_weights(path: str | os.PathLike, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse damaged weights of checkpoint directory ``path`` with a one-line ``ValueError`` naming the file.

    Per safetensors file: the header must parse and cover the file exactly (a truncated or overwritten file
    fails here); each tensor named in ``expected_shapes`` must have that shape (a name missing from it is left
    to the loader's strict key check); every floating-point tensor must be finite, and the first tensor (in the
    file's key order) holding a NaN or inf is named. The values are read one tensor at a time (memory-mapped),
    so this costs one extra read of the weights.
    """
    from safetensors import SafetensorError, safe_open

    for file in weight_files(path):
        name = os.fspath(file)
        try:
            with safe_open(name, framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                bad_shape = next((k for k in keys if expected_shapes is not None and k in expected_shapes
                                  and tuple(expected_shapes[k]) != shapes[k]), None)
                non_finite = None
                if bad_shape is None:
                    for k in keys:
                        t = f.get_tensor(k)
                        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                            non_finite = k
                            break
        except SafetensorError as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"checkpoint weights {name!r} are corrupted or truncated ({detail}); re-download or re-save them"
            ) from None
        if bad_shape is not None:
            raise ValueError(
                f"checkpoint weights {name!r}: tensor {bad_shape!r} has shape {list(shapes[bad_shape])} but the "
                f"config expects {list(expected_shapes[bad_shape])}"
            )
        if non_finite is not None:
            raise ValueError(
                f"checkpoint weights {name!r} hold non-finite values (NaN/inf), first in tensor {non_finite!r}; "
                "refusing to load a diverged or corrupted checkpoint"
            )


def expected_shapes(model_cls, path: str | os.PathLike, kwargs: Mapping) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model ``model_cls.from_pretrained(path, **kwargs)`` builds: its config is
    ``kwargs["config"]`` (an object or a path), else ``path``'s config.json with the overrides among ``kwargs``;
    the model is instantiated on the meta device (no memory, no init)."""
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        source = os.fspath(path if config is None else config)
        overrides = {k: v for k, v in kwargs.items() if k not in ("config", "ignore_mismatched_sizes")}
        config, _ = model_cls.config_class.from_pretrained(source, return_unused_kwargs=True, **overrides)
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}


def official_state_dict_keys(n_blocks: int, adaln: bool = True, var_min: bool = True) -> list[str]:
    """The state-dict keys of the official ``BD3LM`` (``modeling_bd3lm.py``), in registration order."""
    keys = ["sampling_eps_min", "sampling_eps_max"] if var_min else []
    keys.append("backbone.vocab_embed.embedding")
    if adaln:
        keys += [f"backbone.sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    keys.append("backbone.rotary_emb.inv_freq")
    for i in range(n_blocks):
        pre = f"backbone.blocks.{i}."
        keys += [pre + s for s in ("norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight",
                                   "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")]
        if adaln:
            keys += [pre + "adaLN_modulation.weight", pre + "adaLN_modulation.bias"]
    keys += ["backbone.output_layer.norm_final.weight", "backbone.output_layer.linear.weight",
             "backbone.output_layer.linear.bias"]
    if adaln:
        keys += ["backbone.output_layer.adaLN_modulation.weight", "backbone.output_layer.adaLN_modulation.bias"]
    return keys
