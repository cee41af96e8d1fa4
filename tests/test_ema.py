"""EMA of the weights: the update rule with warm-up, swapping in/out, and state_dict round trips."""

import pytest
import torch
from torch import nn

from bd3lm.ema import EMA


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_update_follows_the_warmup_formula():
    net = small_net()
    ema = EMA(net, decay=0.9999)
    ref = {k: v.detach().clone() for k, v in net.named_parameters()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9999, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(net)
        for k, p in net.named_parameters():
            ref[k] = d * ref[k] + (1 - d) * p.detach()
    assert ema.num_updates == 5
    for k, v in ref.items():
        torch.testing.assert_close(ema.shadow[k], v, rtol=1e-6, atol=1e-6)


def test_no_warmup_uses_the_constant_decay():
    net = small_net()
    ema = EMA(net, decay=0.5, warmup=False)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for k, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[k], 0.5 * before[k] + 0.5 * p.detach())


def test_swapped_restores_live_weights_even_on_error():
    net = small_net()
    ema = EMA(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    live = {k: v.detach().clone() for k, v in net.named_parameters()}
    with ema.swapped(net):
        for k, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), ema.shadow[k])
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), live[k])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped(net):
            raise RuntimeError("boom")
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), live[k])
    assert not ema.is_swapped


def test_update_while_swapped_is_refused():
    net = small_net()
    ema = EMA(net)
    ema.store(net)
    with pytest.raises(RuntimeError, match="swapped"):
        ema.update(net)
    ema.restore(net)
    ema.update(net)


def test_state_dict_round_trip_and_strictness():
    net = small_net()
    ema = EMA(net, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1)
        ema.update(net)
    state = ema.state_dict()
    other = EMA(small_net(seed=1), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 3 and other.decay == 0.99
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])
    # the saved state is plain (weights_only-loadable)
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["num_updates"] == 3
    wrong = EMA(nn.Sequential(nn.Linear(4, 5)))
    with pytest.raises((KeyError, ValueError)):
        wrong.load_state_dict(state)
    shapes = EMA(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 7)))
    with pytest.raises(ValueError, match="shape"):
        shapes.load_state_dict(state)


def test_shadow_is_float32_for_low_precision_params():
    net = small_net().to(torch.bfloat16)
    ema = EMA(net)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.update(net)
    with ema.swapped(net):
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
