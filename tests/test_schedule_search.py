import pytest
import torch
from conftest import tiny_model

from bd3lm.objectives import diffusion_loss
from bd3lm.schedule_search import clipped_schedule_search, default_candidates


def test_default_grid_is_the_official_one():
    grid = default_candidates(4)
    assert len(grid) == 36 and grid[0] == (1e-3, 1.0)
    assert (1e-3, 0.5) in grid and (0.5, 1.0) in grid and (0.1, 1.0) in grid and (0.05, 0.55) in grid
    assert all(hi - lo <= 0.9 + 1e-9 for lo, hi in grid[1:])
    assert default_candidates(1) == [(1e-3, 1.0), (1.0, 1.0)]


def batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (4, 16), generator=g) for _ in range(n)]


def test_search_picks_the_smallest_measured_variance_and_is_reproducible():
    model = tiny_model(block_size=4)
    cands = [(1e-3, 1.0), (0.3, 0.8), (0.5, 1.0), (1e-3, 0.5)]
    r1 = clipped_schedule_search(model, batches(), candidates=cands, generator=torch.Generator().manual_seed(7))
    r2 = clipped_schedule_search(model, batches(), candidates=cands, generator=torch.Generator().manual_seed(7))
    assert r1.table == r2.table
    variances = [row["variance"] for row in r1.table]
    assert r1.best == cands[variances.index(min(variances))]
    # the table's variance is what it says: Σ over batches of Var(per-block loss), recomputed independently
    g = torch.Generator().manual_seed(7)
    ref = {}
    with torch.no_grad():
        for lo, hi in cands:
            ref[(lo, hi)] = sum(
                float(diffusion_loss(model, x, interval=(lo, hi), generator=g).per_block.double().var())
                for x in batches()
            )
    for row in r1.table:
        assert row["variance"] == pytest.approx(ref[row["interval"]], rel=1e-9)


def test_block_size_one_search_prefers_all_masked():
    model = tiny_model(block_size=1)
    res = clipped_schedule_search(model, batches(2), generator=torch.Generator().manual_seed(0))
    assert res.best == (1.0, 1.0)  # the all-masked AR loss has far lower variance than the 1/t estimator


def test_infeasible_candidates_are_skipped_and_empty_batches_rejected():
    model = tiny_model(block_size=4)
    res = clipped_schedule_search(model, batches(1), candidates=[(0.4, 0.45), (1e-3, 1.0)])
    assert res.table[0]["variance"] == float("inf") and res.best == (1e-3, 1.0)
    with pytest.raises(ValueError, match="at least one validation batch"):
        clipped_schedule_search(model, [])
