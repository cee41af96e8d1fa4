"""EMA of the weights: the update rule with warm-up (closed forms), swapping in/out, state_dict round trips, and
the EMA of sharded weights (FSDP1 layout simulated by hand; the real 2-rank run is in test_ema_fsdp.py)."""

import copy
import math

import pytest
import torch
from torch import nn

from bd3lm.ema import EMA, gather_shadow, scatter_shadow


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


# ------------------------------------------------------------------------------------------ closed forms


def test_warmup_from_zero_towards_a_constant_matches_the_closed_form():
    # theta_0 = 0, then theta = 1 for ever: shadow_n = 1 - prod_{k<=n} decay_k, and with the warm-up alone
    # prod_{k=1..n} (1 + k) / (10 + k) = 10! (n + 1)! / (n + 10)!
    net = nn.Linear(3, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    ema = EMA(net, decay=0.9999)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    for n in range(1, 13):
        ema.update(net)
        expected = 1 - math.factorial(10) * math.factorial(n + 1) / math.factorial(n + 10)
        for v in ema.shadow.values():
            torch.testing.assert_close(v, torch.full_like(v, expected), rtol=0, atol=1e-6)
    # the first update is not a copy (torch's AveragedModel copies on its first update): 2/11 of theta_0 remain
    first = EMA(nn.Linear(3, 2), decay=0.9999)
    start = {k: v.clone() for k, v in first.shadow.items()}
    target = nn.Linear(3, 2)
    first.update(target)
    for k, p in target.named_parameters():
        torch.testing.assert_close(first.shadow[k], 2 / 11 * start[k] + 9 / 11 * p.detach(), rtol=0, atol=1e-6)


def test_decay_cap_takes_over_from_the_warmup():
    # decay 0.5: (1 + n) / (10 + n) < 0.5 for n <= 7, then 0.5; theta_0 = 0, theta = 1
    net = nn.Linear(2, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    decays = []
    for _ in range(10):
        decays.append(ema.current_decay())
        ema.update(net)
    assert decays == [min(0.5, (1 + n) / (10 + n)) for n in range(1, 11)]
    assert decays[6] < 0.5 and decays[7:] == [0.5, 0.5, 0.5]
    residual = math.prod(decays)
    for v in ema.shadow.values():
        torch.testing.assert_close(v, torch.full_like(v, 1 - residual), rtol=0, atol=1e-6)


def test_buffers_are_neither_averaged_nor_swapped():
    net = small_net()
    net.register_buffer("sampling_eps_min", torch.tensor(0.3))
    ema = EMA(net)
    assert "sampling_eps_min" not in ema.shadow
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    with ema.swapped(net):
        net.sampling_eps_min.fill_(0.7)  # the search sets the interval while the EMA weights are in
    assert float(net.sampling_eps_min) == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------ sharded weights


def shard(net: nn.Module, world: int) -> list[nn.Module]:
    """Per-rank copies of ``net`` as FSDP1 with use_orig_params leaves them: the parameters, flattened and
    concatenated (padded to a multiple of ``world``), are split into equal chunks, and every parameter becomes
    the 1-D view of its part of this rank's chunk (possibly empty)."""
    total = sum(p.numel() for p in net.parameters())
    chunk = -(-total // world)
    ranks = []
    for r in range(world):
        m = copy.deepcopy(net)
        lo, hi, off = r * chunk, (r + 1) * chunk, 0
        for p in m.parameters():
            n = p.numel()
            a, b = max(lo, off), min(hi, off + n)
            p.data = p.detach().reshape(-1)[a - off : max(a, b) - off].clone()
            off += n
        ranks.append(m)
    return ranks


class FakeStrategy:
    """Stands in for the FSDP collectives: the gather concatenates the ranks' shards, the load splits."""

    def __init__(self, ranks: list[nn.Module], shapes: dict):
        self.ranks, self.shapes, self.gathers = ranks, shapes, 0

    def gather_full(self) -> dict:
        self.gathers += 1
        named = [dict(m.named_parameters()) for m in self.ranks]
        return {k: torch.cat([n[k].detach() for n in named]).view(s) for k, s in self.shapes.items()}

    def load_full(self, rank: int):
        def load(full: dict) -> None:
            with torch.no_grad():
                for k, p in self.ranks[rank].named_parameters():
                    start = sum(dict(m.named_parameters())[k].numel() for m in self.ranks[:rank])
                    p.copy_(full[k].reshape(-1)[start : start + p.numel()])

        return load


def test_sharded_updates_equal_the_unsharded_ema_bit_for_bit_and_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 7), nn.Linear(7, 1))  # 50 parameters
    full_ema = EMA(net, decay=0.999)
    ranks = shard(net, 3)
    assert any(p.numel() == 0 for p in ranks[2].parameters())  # some parameters live on one rank only
    emas = [EMA(net, decay=0.999) for _ in ranks]  # built before sharding, as BD3LMLit.__init__ does
    fake = FakeStrategy(ranks, full_ema.shapes)
    for r, e in enumerate(emas):  # the full shadow -> this rank's shard (on_fit_start)
        scatter_shadow(e, ranks[r], dict(e.shadow), fake.load_full(r))
        assert e.sharded and all(v.dim() == 1 for v in e.shadow.values())
    for _ in range(5):  # the optimiser moves the live weights; each rank updates its shard of the EMA
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        live = {k: p.detach().clone() for k, p in net.named_parameters()}
        for r in range(3):
            fake.load_full(r)(live)
            emas[r].update(ranks[r])
        full_ema.update(net)
    # gather: every rank swaps its shard in (a collective), rank 0 receives the full shadow
    for r in (1, 2):
        emas[r].store(ranks[r])
    gathered = gather_shadow(emas[0], ranks[0], fake.gather_full)
    for r in (1, 2):
        emas[r].restore(ranks[r])
    assert fake.gathers == 1 and not emas[0].is_swapped
    for k, v in full_ema.shadow.items():
        assert torch.equal(gathered[k], v), k  # bit for bit
    for r in range(3):  # the live shards are back
        for k, p in ranks[r].named_parameters():
            start = sum(dict(m.named_parameters())[k].numel() for m in ranks[:r])
            flat = dict(net.named_parameters())[k].detach().reshape(-1)
            assert torch.equal(p.detach(), flat[start : start + p.numel()])
    # checkpoint round trip: the full state loads (shapes checked against the full ones) and scatters again
    state = {**emas[0].state_dict(), "shadow": gathered}
    for r in range(3):
        other = EMA(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 7), nn.Linear(7, 1)))
        before = {k: p.detach().clone() for k, p in ranks[r].named_parameters()}
        other.load_state_dict(state)
        assert not other.sharded and other.num_updates == 5
        scatter_shadow(other, ranks[r], dict(other.shadow), fake.load_full(r))
        for k, v in emas[r].shadow.items():
            assert torch.equal(other.shadow[k], v)
        for k, p in ranks[r].named_parameters():
            assert torch.equal(p.detach(), before[k])


def test_sharded_gather_refuses_wrong_shapes_and_low_precision():
    net = small_net()
    ranks = shard(net, 2)
    ema = EMA(net)
    fake = FakeStrategy(ranks, ema.shapes)
    scatter_shadow(ema, ranks[0], dict(ema.shadow), fake.load_full(0))
    with pytest.raises(ValueError, match="full shape"):  # e.g. a sharded state_dict_type
        gather_shadow(ema, ranks[0], lambda: {k: p.detach() for k, p in ranks[0].named_parameters()})
    assert not ema.is_swapped
    assert gather_shadow(ema, ranks[0], dict) == {}  # ranks other than 0 receive nothing
    low = shard(small_net().to(torch.bfloat16), 2)
    low_ema = EMA(small_net().to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        scatter_shadow(low_ema, low[0], dict(low_ema.shadow), FakeStrategy(low, low_ema.shapes).load_full(0))


def test_from_state_dict_and_wrapper_names():
    net = small_net()
    ema = EMA(net, decay=0.9)
    ema.update(small_net(seed=3))
    again = EMA.from_state_dict(small_net(seed=4), ema.state_dict())
    assert again.decay == 0.9 and again.num_updates == 1
    assert all(torch.equal(again.shadow[k], v) for k, v in ema.shadow.items())

    class Wrapped(nn.Module):  # FSDP auto-wrapping inserts _fsdp_wrapped_module into the names
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    wrapped = nn.Sequential(Wrapped(small_net(seed=5)))
    plain = nn.Sequential(small_net(seed=5))
    e = EMA(plain)
    e.update(wrapped)  # same names once cleaned
    assert set(EMA(wrapped).shadow) == set(e.shadow)
