"""The RoPE-base bound (Xu, Men et al., NeurIPS 2024) against the paper's table."""
import numpy as np
import pytest

from pocketlm import rope
from tests.conftest import make_tiny_gemma3


def test_bound_is_half_the_head_dim_at_zero_and_the_cosine_sum_elsewhere():
    assert rope.bound([0], 1e4, 64)[0] == 32
    theta = 1e4 ** (-np.arange(0, 64, 2) / 64)
    assert rope.bound([777], 1e4, 64)[0] == pytest.approx(np.cos(777 * theta).sum())


def test_supported_length_is_the_last_position_before_the_bound_turns_negative():
    base, d = 1e4, 64
    L = rope.supported_length(base, d)
    b = rope.bound(np.arange(L + 2), base, d)
    assert (b[: L + 1] >= 0).all() and b[L + 1] < 0


@pytest.mark.parametrize("length,base", [(4_000, 2.7e4), (32_000, 6.4e5)])
def test_required_base_reproduces_the_papers_table_for_head_dim_128(length, base):
    """Paper, head dim 128: 4k tokens need a base of 2.7e4, 32k need 6.4e5 (two significant
    digits; our scan lands on 6.3e5 for 32k, the grid step next to it)."""
    got = rope.required_base(length, 128)
    assert got == pytest.approx(base, rel=0.02)
    assert rope.supported_length(got, 128, cap=length) >= length
    below = [b for b in rope.base_grid(10, got) if b < got]
    assert all(rope.supported_length(b, 128, cap=length) < length for b in below[-20:])


def test_report_covers_global_and_sliding_bases():
    r = rope.report(make_tiny_gemma3().config)
    assert r["rope_theta"] == 1e6 and r["rope_theta_sliding"] == 1e4 and r["head_dim"] == 32
    assert r["supported_context"] > r["supported_context_sliding"]
