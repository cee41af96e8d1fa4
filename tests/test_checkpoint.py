import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM

import bd3lm
from bd3lm.checkpoint import official_state_dict_keys

SMALL = dict(vocab_size=50258, model_length=1024, block_size=4, hidden_dim=768, cond_dim=128, n_blocks=12,
             n_heads=12)


def official_shapes(V, d, cond, n_blocks, heads):
    """Shapes of the official small-family state dict, written out independently of our modules."""
    s = {"sampling_eps_min": (), "sampling_eps_max": (), "backbone.vocab_embed.embedding": (V, d),
         "backbone.sigma_map.mlp.0.weight": (cond, 256), "backbone.sigma_map.mlp.0.bias": (cond,),
         "backbone.sigma_map.mlp.2.weight": (cond, cond), "backbone.sigma_map.mlp.2.bias": (cond,),
         "backbone.rotary_emb.inv_freq": (d // heads // 2,),
         "backbone.output_layer.norm_final.weight": (d,), "backbone.output_layer.linear.weight": (V, d),
         "backbone.output_layer.linear.bias": (V,), "backbone.output_layer.adaLN_modulation.weight": (2 * d, cond),
         "backbone.output_layer.adaLN_modulation.bias": (2 * d,)}
    for i in range(n_blocks):
        p = f"backbone.blocks.{i}."
        s.update({p + "norm1.weight": (d,), p + "attn_qkv.weight": (3 * d, d), p + "attn_out.weight": (d, d),
                  p + "norm2.weight": (d,), p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,),
                  p + "mlp.2.weight": (d, 4 * d), p + "mlp.2.bias": (d,),
                  p + "adaLN_modulation.weight": (6 * d, cond), p + "adaLN_modulation.bias": (6 * d,)})
    return s


def test_small_config_matches_the_official_state_dict():
    with torch.device("meta"):
        model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**SMALL))
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 169_627_218
    assert len(sd) == 133
    assert list(sd) == official_state_dict_keys(12)
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(50258, 768, 128, 12, 12)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(official_state_dict_keys(2))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bd3lm" and cfg["architectures"] == ["BD3LM"] and cfg["block_size"] == 4
    assert cfg["attn_backend"] == "sdpa" and model.config.attn_backend is None  # official code reads sdpa/flex
    loaded = bd3lm.BD3LM.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(0, 32, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-5, rtol=0)
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)) is bd3lm.BD3LM


def test_loads_a_hand_built_official_directory(tmp_path):
    V, d, cond, nb, h = 40, 32, 16, 2, 4
    g = torch.Generator().manual_seed(3)
    tensors = {k: torch.randn(shape, generator=g) if shape else torch.tensor(0.25)
               for k, shape in official_shapes(V, d, cond, nb, h).items()}
    tensors["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d // h, 2).float() / (d // h)))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({
        "_name_or_path": "kuleshov-group/bd3lm-owt-block_size4", "architectures": ["BD3LM"],
        "attn_backend": "sdpa", "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
                                             "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
        "block_size": 4, "cond_dim": cond, "cross_attn": True, "dropout": 0.1, "hidden_dim": d,
        "model_length": 16, "model_type": "bd3lm", "n_blocks": nb, "n_heads": h, "return_dict": False,
        "sampling_eps_max": 0.999, "sampling_eps_min": 0.001, "time_conditioning": False,
        "torch_dtype": "float32", "transformers_version": "4.49.0", "var_min": True, "vocab_size": V}))
    for loader in (bd3lm.BD3LM.from_pretrained, AutoModelForMaskedLM.from_pretrained):
        model = loader(str(tmp_path))
        assert isinstance(model, bd3lm.BD3LM)
        sd = model.state_dict()
        for k, t in tensors.items():
            assert torch.equal(sd[k], t), k
        assert model.config.mask_index == V - 1
        with torch.no_grad():
            out = model.eval()(input_ids=torch.randint(0, V, (1, 32)))
        assert out.logits.shape == (1, 16, V) and torch.isfinite(out.logits).all()


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / "nope"))
    tiny_model().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / "a"))
    tiny_model().save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / "b"))
    tiny_model().save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["n_blocks"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the BD3LM config"):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / "c"))


def _one_line_value_error(path, match):
    with pytest.raises(ValueError, match=match) as err:
        bd3lm.BD3LM.from_pretrained(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_or_overwritten_weights_are_refused_naming_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    msg = _one_line_value_error(tmp_path / "t", "corrupted or truncated")
    assert repr(str(weights)) in msg
    for cut in (4, 0):  # not even a complete header length
        weights.write_bytes(data[:cut])
        _one_line_value_error(tmp_path / "t", "corrupted or truncated")
    header = bytearray(data)
    header[10:30] = b"x" * 20
    weights.write_bytes(bytes(header))
    _one_line_value_error(tmp_path / "t", "corrupted or truncated")


def test_a_tensor_of_the_wrong_shape_is_refused_naming_the_file_and_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path / "s")
    weights = tmp_path / "s" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["backbone.blocks.1.mlp.0.bias"] = torch.zeros(7)  # the config (hidden 32) expects 4 * 32 = 128
    save_file(tensors, str(weights), metadata={"format": "pt"})
    msg = _one_line_value_error(tmp_path / "s", "'backbone.blocks.1.mlp.0.bias' has shape \\[7\\]")
    assert repr(str(weights)) in msg and "[128]" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path, bad):
    tiny_model().save_pretrained(tmp_path / "n")
    weights = tmp_path / "n" / "model.safetensors"
    tensors = load_file(str(weights))
    poisoned = ["backbone.output_layer.linear.weight", "backbone.blocks.1.attn_out.weight"]
    for name in poisoned:
        tensors[name][0, 3] = bad
    save_file(tensors, str(weights), metadata={"format": "pt"})
    msg = _one_line_value_error(tmp_path / "n", "non-finite")
    assert repr(str(weights)) in msg
    assert f"first in tensor {min(poisoned)!r}" in msg  # safetensors files list their tensors by name


def test_a_non_finite_shard_is_named(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    shards = sorted((tmp_path / "sh").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sh" / "model.safetensors").exists()
    assert torch.equal(bd3lm.BD3LM.from_pretrained(tmp_path / "sh").backbone.vocab_embed.embedding,
                       model.backbone.vocab_embed.embedding)
    last = load_file(str(shards[-1]))
    name = sorted(last)[0]
    last[name].view(-1)[0] = float("nan")
    save_file(last, str(shards[-1]), metadata={"format": "pt"})
    msg = _one_line_value_error(tmp_path / "sh", "non-finite")
    assert repr(str(shards[-1])) in msg and repr(name) in msg
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bd3lm.BD3LM.from_pretrained(tmp_path / "sh")
