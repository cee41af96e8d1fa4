"""Checkpoint directories in the official Hugging Face layout (config.json + model.safetensors).

``BD3LM.from_pretrained`` / ``save_pretrained`` do the work; this module checks a local directory first so a
missing file is one clear line, and lists the official state-dict keys (for tests and for strict imports).
"""

from __future__ import annotations

import os

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
