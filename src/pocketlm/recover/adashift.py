"""AdaShift (Zhou, Zhang et al., "AdaShift: Decorrelation and Convergence of Adaptive Learning
Rate Methods", ICLR 2019).

Adam's second moment v_t and its gradient g_t are correlated (a large gradient inflates its own
denominator), which is what makes Adam fail to converge on the paper's counter-examples.
AdaShift keeps the last n gradients: the first moment is their beta1-weighted average,

    m_t = sum_{i<n} beta1^i g_{t-i} / sum_{i<n} beta1^i,

and the second moment is built only from the gradient that has just left that window, reduced
by a spatial function phi (the maximum over the tensor by default),

    v_t = beta2 v_{t-1} + (1 - beta2) phi(g_{t-n}^2),
    theta_t = theta_{t-1} - lr m_t / (sqrt(v_t / c_t) + eps),

so v_t is independent of the gradients in m_t. No step is taken until n + 1 gradients have been
seen. ``c_t = 1 - beta2^k`` (k = updates of v so far) is Adam's bias correction; the paper's
algorithm has none (``bias_correction=False`` follows it exactly), without it the first steps
are up to 1/sqrt(1 - beta2) ~ 32 times larger than lr.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

REDUCERS = {
    "max": lambda t: t.max(),  # the paper's choice: one value per tensor
    "row-max": lambda t: t.amax(dim=-1, keepdim=True) if t.dim() > 1 else t.max(),
    "none": lambda t: t,  # elementwise (no spatial sharing)
}


class AdaShift(Optimizer):
    def __init__(self, params, lr: float = 1e-3, n: int = 10, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-10, phi: str = "max", weight_decay: float = 0.0, bias_correction: bool = True,
                 state_dtype: torch.dtype | None = None):
        if lr <= 0 or n < 1 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps < 0:
            raise ValueError("AdaShift needs lr > 0, n >= 1, 0 <= betas < 1 and eps >= 0")
        if phi not in REDUCERS:
            raise ValueError(f"phi must be one of {', '.join(REDUCERS)}")
        super().__init__(params, dict(lr=lr, n=n, betas=betas, eps=eps, phi=phi, weight_decay=weight_decay,
                                      bias_correction=bias_correction, state_dtype=state_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            n, (beta1, beta2) = group["n"], group["betas"]
            weights = [beta1 ** i for i in range(n)]  # weights[i] multiplies g_{t-i}
            total = sum(weights)
            reduce = REDUCERS[group["phi"]]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["grads"] = []  # oldest first: g_{t-n}, ..., g_t once full
                    st["updates"] = 0
                    st["v"] = None
                dtype = group["state_dtype"] or p.dtype
                st["grads"].append(p.grad.detach().to(dtype, copy=True))
                if len(st["grads"]) <= n:
                    continue
                shifted = st["grads"].pop(0).float()  # g_{t-n}, just out of the window
                m = torch.zeros_like(p, dtype=torch.float32)
                for i, g in enumerate(reversed(st["grads"])):  # g_t, g_{t-1}, ...
                    m.add_(g.float(), alpha=weights[i] / total)
                sq = reduce(shifted * shifted)
                st["v"] = (1 - beta2) * sq if st["v"] is None else beta2 * st["v"] + (1 - beta2) * sq
                st["updates"] += 1
                v = st["v"] / (1 - beta2 ** st["updates"]) if group["bias_correction"] else st["v"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m / (v.sqrt() + group["eps"])).to(p.dtype), alpha=-group["lr"])
        return loss
