import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bd3lm.masks import allowed_fraction, block_causal_mask, check_block_size, two_stream_mask


def closed_form(n: int, bs: int) -> torch.Tensor:
    """The three-term definition, written with explicit loops over blocks."""
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    nb = n // bs
    for bq in range(nb):
        q = slice(bq * bs, (bq + 1) * bs)
        qc = slice(n + bq * bs, n + (bq + 1) * bs)
        m[q, q] = True  # M_BD noisy
        m[qc, qc] = True  # M_BD clean
        for bk in range(nb):
            kc = slice(n + bk * bs, n + (bk + 1) * bs)
            if bk < bq:
                m[q, kc] = True  # M_OBC
            if bk <= bq:
                m[qc, kc] = True  # M_BC
    return m


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8))
def test_two_stream_mask_equals_closed_form(n_blocks, bs):
    n = n_blocks * bs
    assert torch.equal(two_stream_mask(n, bs), closed_form(n, bs))


@pytest.mark.parametrize("n", [8, 16, 24])
def test_block_size_one_and_l(n):
    assert torch.equal(two_stream_mask(n, 1), closed_form(n, 1))
    full = two_stream_mask(n, n)
    assert full[:n, :n].all() and not full[:n, n:].any()  # MDLM: x_t sees all of x_t, nothing of x_0
    assert torch.equal(block_causal_mask(n, 1), torch.ones(n, n, dtype=torch.bool).tril())
    assert block_causal_mask(n, n).all()


def test_allowed_fraction_matches_paper_and_dense():
    assert allowed_fraction(1024, 4) == pytest.approx(0.25098, abs=5e-6)
    assert allowed_fraction(1024, 16) == pytest.approx(0.25391, abs=5e-6)
    assert allowed_fraction(1024, 1024) == 0.5
    for n, bs in [(64, 4), (64, 1), (48, 16)]:
        assert two_stream_mask(n, bs).sum().item() == round(allowed_fraction(n, bs) * (2 * n) ** 2)


def test_block_causal_rows_slice():
    full = block_causal_mask(12, 4)
    assert torch.equal(block_causal_mask(12, 4, q_start=8, n_q=4), full[8:])


def test_bad_block_size():
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of block_size 4"):
        check_block_size(10, 4)
    with pytest.raises(ValueError, match="block_size must be a positive integer; got 0"):
        two_stream_mask(8, 0)
