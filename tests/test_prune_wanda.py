"""Wanda (prune/wanda.py)."""

import torch

from pocketlm import compress, models
from tests.conftest import make_tiny, random_windows


def test_wanda_per_row_sparsity_exact_and_sequential_outputs_recomputed():
    m = make_tiny(layers=2)
    res = compress(m, "wanda-50", calibration=random_windows())
    for name, lin in models.layer_linears(m).items():
        zeros = (lin.weight == 0).sum(1)
        assert (zeros == round(0.5 * lin.in_features)).all(), name
        assert torch.equal(res.context.masks[name], lin.weight != 0)
    assert res.context.size_report()["sparsity"] == 0.5
