"""SparseGPT (prune/sparsegpt.py)."""

import torch

from pocketlm.prune.masks import parse_target, select
from pocketlm.prune.sparsegpt import sparsegpt
from tests.conftest import nm_ok


def test_sparsegpt_exact_count_and_error_below_mask_only_pruning():
    g = torch.Generator().manual_seed(0)
    d_in, n = 256, 2048
    X = (torch.randn(n, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in**0.5))
    X = X * torch.linspace(0.2, 3, d_in)[torch.randperm(d_in, generator=g)]  # outlier features, anywhere
    W = torch.randn(96, d_in, generator=g) * 0.05
    H = 2 / n * X.T @ X
    err = lambda Q: ((W - Q) @ X.T).pow(2).sum().item()  # noqa: E731
    for t in ("0.5", "2:4"):
        target = parse_target(float(t) if "." in t else t)
        Q, keep = sparsegpt(W, H, target)
        assert torch.equal(Q != 0, keep)
        if target.nm:
            assert nm_ok(Q, 2, 4)
        else:
            assert int((~keep).sum()) == W.numel() // 2
        norms = X.pow(2).sum(0).sqrt()
        wanda = W * select(W.abs() * norms, target, per_row=True)
        assert err(Q) < 0.8 * err(wanda), t
        assert err(Q) < 0.8 * err(W * keep), t  # the weight update is what helps, not only the mask


def test_sparsegpt_solve_for_a_given_mask():
    """The fixed-mask solve Barber uses after SparseGPT: for SparseGPT's own mask it returns
    SparseGPT's weights, and it beats zeroing the pruned weights of any mask."""
    from pocketlm.prune.masks import Target
    from pocketlm.prune.sparsegpt import sparsegpt

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3
    W, H = torch.randn(32, 64, generator=g), 2 * X.T @ X / 2000
    Ws, keep = sparsegpt(W, H, Target(0.5, None))
    assert torch.equal(sparsegpt(W, H, None, keep=keep)[0], Ws)
    other = torch.rand(32, 64, generator=g) > 0.5
    Wo, k2 = sparsegpt(W, H, None, keep=other)
    assert torch.equal(k2, other) and bool((Wo[~other] == 0).all())
    err = lambda V: float(((X @ (W - V).T) ** 2).mean())  # noqa: E731
    assert err(Wo) < 0.9 * err(W * other)
