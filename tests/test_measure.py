import pytest
import math

import torch
import torch.nn.functional as F

from pocketlm.measure import evaluate_windows
from tests.conftest import make_tiny


def test_perplexity_equals_a_hand_computation():
    model = make_tiny(layers=2)
    windows = torch.randint(0, 5000, (3, 50))
    res = evaluate_windows(model, windows, chunk=16)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            logp = F.log_softmax(logits.double(), -1)
            for t in range(w.numel() - 1):
                total -= logp[t, w[t + 1]].item()
                count += 1
    assert res.tokens_scored == count == 3 * 49
    assert math.isclose(res.ppl, math.exp(total / count), rel_tol=1e-5)
    # each window's own mean NLL: the first window alone scores the same as the first window's entry
    first = evaluate_windows(model, windows[:1], chunk=16)
    assert len(res.window_nll) == 3 and math.isclose(res.window_nll[0], first.nll, rel_tol=1e-6)
    assert math.isclose(sum(res.window_nll) / 3, res.nll, rel_tol=1e-6)
    # perplexity by position: 4 buckets over the 49 predicted positions (0, 12, 24, 36), each
    # the hand-computed perplexity of its positions in every window
    res4 = evaluate_windows(model, windows, chunk=16, buckets=4)
    assert res4.bucket_start == [0, 12, 24, 36]
    with torch.no_grad():
        nll = torch.stack([-F.log_softmax(model(w[None]).logits[0, :-1].double(), -1).gather(1, w[1:, None])[:, 0]
                           for w in windows])
    for k, (a, b) in enumerate(zip(res4.bucket_start, [12, 24, 36, 49])):
        assert math.isclose(res4.bucket_ppl[k], math.exp(nll[:, a:b].mean().item()), rel_tol=1e-5)


def test_kl_against_itself_is_zero_and_against_a_perturbed_copy_positive():
    model = make_tiny(layers=2)
    other = make_tiny(layers=2)
    other.load_state_dict(model.state_dict())
    windows = torch.randint(0, 5000, (2, 40))
    same = evaluate_windows(model, windows, reference=other)
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0 and math.isclose(same.ppl, same.ref_ppl, rel_tol=1e-6)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    diff = evaluate_windows(model, windows, reference=other)
    assert diff.kl > 1e-4 and diff.top1 < 1.0
    assert len(diff.window_kl) == 2 and math.isclose(sum(diff.window_kl) / 2, diff.kl, rel_tol=1e-6)
    assert math.isclose(diff.ppl, same.ppl, rel_tol=1e-6)  # the evaluated model did not change


def test_reference_cache_gives_the_same_kl_as_the_reference_model(tmp_path):
    from pocketlm.measure import ReferenceCache, evaluate_windows
    from tests.conftest import make_tiny

    ref, model = make_tiny(seed=0), make_tiny(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    windows = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    direct = evaluate_windows(model, windows, reference=ref)
    cache = ReferenceCache.build(ref, windows, tmp_path / "ref.f32")
    cached = evaluate_windows(model, windows, reference=cache)
    assert cached.kl == pytest.approx(direct.kl, rel=1e-5) and cached.top1 == direct.top1
    assert cached.ref_ppl == pytest.approx(direct.ref_ppl, rel=1e-6) and direct.kl > 0
    with pytest.raises(ValueError, match="other windows"):
        ReferenceCache(tmp_path / "ref.f32", windows[:, :20])
