"""Pruning targets and masks (prune/masks.py): exact counts per row and per matrix, N:M
patterns, overrides, and the one-line errors for bad targets."""

import pytest
import torch

from pocketlm import compress, models
from pocketlm.errors import PocketError
from pocketlm.prune.masks import parse_target, select
from tests.conftest import make_tiny, nm_ok, random_windows


def test_select_exact_per_row_per_matrix_and_nm():
    s = torch.rand(48, 96, generator=torch.Generator().manual_seed(1))
    keep = select(s, parse_target(0.3), per_row=True)
    assert (keep.sum(1) == 96 - round(0.3 * 96)).all()
    keep = select(s, parse_target(0.37), per_row=False)
    assert int((~keep).sum()) == round(0.37 * s.numel())
    # the dropped ones are the lowest scores
    assert s[~keep].max() <= s[keep].min()
    keep = select(s, parse_target("2:4"), per_row=True)
    assert (keep.reshape(48, -1, 4).sum(-1) == 2).all()


def test_bad_targets_fail_in_one_line():
    with pytest.raises(PocketError, match="N:M pattern"):
        compress(make_tiny(), {"stages": [{"method": "wanda", "pattern": "two of four"}]})
    with pytest.raises(PocketError, match="between 1 and M-1"):
        compress(make_tiny(), {"stages": [{"method": "magnitude", "pattern": "4:2"}]})
    with pytest.raises(PocketError, match="put a pruning stage"):
        compress(make_tiny(), {"stages": [{"method": "barber"}]}, calibration=random_windows())


def test_overrides_give_linears_their_own_target():
    m = make_tiny(layers=1)
    compress(m, {"stages": [{"method": "magnitude", "sparsity": 0.5, "per_row": True,
                             "overrides": {"*.mlp.down_proj": 0.25, "*.self_attn.q_proj": "4:8"}}]})
    lin = models.layer_linears(m)
    assert ((lin["model.layers.0.mlp.down_proj"].weight == 0).sum(1) == 40).all()  # 160 inputs
    assert nm_ok(lin["model.layers.0.self_attn.q_proj"].weight, 4, 8)
    assert ((lin["model.layers.0.mlp.up_proj"].weight == 0).sum(1) == 32).all()


@pytest.mark.slow
def test_nm_pattern_holds_after_pruning_rebuild_and_gptq():
    m = make_tiny(layers=2)
    res = compress(m, {"stages": [{"method": "sparsegpt", "pattern": "2:4"},
                                  {"method": "barber", "alpha": 0.5, "granularity": "row"},
                                  {"method": "gptq", "bits": 4, "group_size": 32}]}, calibration=random_windows())
    for name, lin in models.layer_linears(m).items():
        assert nm_ok(lin.weight, 2, 4), name
        assert (lin.weight[~res.context.masks[name]] == 0).all(), name  # GPTQ kept pruned weights at zero
