"""AdaShift's steps against a hand computation of the paper's update rule."""
import math

import pytest
import torch

from pocketlm.recover.adashift import AdaShift

GRADS = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0]), torch.tensor([-1.0, 1.0]), torch.tensor([2.0, 0.0])]


def run(opt_kw):
    p = torch.nn.Parameter(torch.tensor([0.3, -0.7]))
    opt = AdaShift([p], **opt_kw)
    seen = []
    for g in GRADS:
        p.grad = g.clone()
        opt.step()
        seen.append(p.detach().clone())
    return seen


@pytest.mark.parametrize("corrected", [True, False])
def test_first_steps_equal_a_hand_computation(corrected):
    lr, b1, b2, eps, n = 0.1, 0.5, 0.9, 1e-10, 2
    seen = run(dict(lr=lr, n=n, betas=(b1, b2), eps=eps, bias_correction=corrected))
    p0 = torch.tensor([0.3, -0.7])
    # no step until n + 1 = 3 gradients are held
    assert torch.equal(seen[0], p0) and torch.equal(seen[1], p0)
    g1, g2, g3, g4 = GRADS
    # step 3: m from g3, g2; v from g1 (the gradient just out of the window), phi = max over the tensor
    m3 = (g3 + b1 * g2) / (1 + b1)
    v3 = (1 - b2) * float((g1 ** 2).max())
    vh3 = v3 / (1 - b2) if corrected else v3
    p3 = p0 - lr * m3 / (math.sqrt(vh3) + eps)
    assert torch.allclose(seen[2], p3, atol=1e-6)
    m4 = (g4 + b1 * g3) / (1 + b1)
    v4 = b2 * v3 + (1 - b2) * float((g2 ** 2).max())
    vh4 = v4 / (1 - b2 ** 2) if corrected else v4
    p4 = p3 - lr * m4 / (math.sqrt(vh4) + eps)
    assert torch.allclose(seen[3], p4, atol=1e-6)


def test_second_moment_never_sees_the_gradients_of_the_first():
    """Decorrelation: the step at t does not depend on how large g_t is through v_t (unlike Adam)."""
    a = run(dict(lr=0.1, n=2, betas=(0.5, 0.9)))
    GRADS[2] = GRADS[2] * 100
    try:
        b = run(dict(lr=0.1, n=2, betas=(0.5, 0.9)))
    finally:
        GRADS[2] = GRADS[2] / 100
    p0 = torch.tensor([0.3, -0.7])
    # m scales with g3 but v does not: the step grows ~linearly (Adam's would stay bounded)
    step_a, step_b = (a[2] - p0).abs().max(), (b[2] - p0).abs().max()
    assert step_b > 30 * step_a


def test_state_survives_a_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdaShift([p], lr=0.01, n=2)
    for g in GRADS[:3]:
        p.grad = torch.cat([g, g[:1]])
        opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdaShift([q], lr=0.01, n=2)
    opt2.load_state_dict(sd)
    for o, t in ((opt, p), (opt2, q)):
        t.grad = torch.tensor([1.0, 2.0, 3.0])
        o.step()
    assert torch.equal(p, q)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        AdaShift([torch.nn.Parameter(torch.zeros(1))], n=0)
    with pytest.raises(ValueError):
        AdaShift([torch.nn.Parameter(torch.zeros(1))], phi="median")
