"""The model judge's decision rule (prune/judge.py)."""

import torch


def test_model_judge_asks_for_a_decrease_beyond_the_noise():
    """A paired per-chunk decrease counts only if it exceeds ``margin`` standard errors: a
    small mean drop with large scatter does not, a consistent one does; margin 0 takes any drop."""
    from pocketlm.prune.judge import ModelJudge

    judge = ModelJudge.__new__(ModelJudge)
    old = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    noisy = old + torch.tensor([0.1, -0.1] * 8, dtype=torch.float64) - 0.01  # mean -0.01, SE ~0.026
    steady = old - 0.01 + torch.tensor([0.001, -0.001] * 8, dtype=torch.float64)
    judge.margin = 2.0
    assert not judge.better(noisy, old) and judge.better(steady, old)
    assert not judge.better(old + 0.01, old)
    judge.margin = 0.0
    assert judge.better(noisy, old) and not judge.better(old, old)
