"""How much each linear's quantization costs, measured where it matters.

APTQ's attention-aware curvature (Guan et al., 2024), as a Gauss-Newton estimate: for a few
calibration windows, a random vector r ~ N(0, I) over the decoder layer's output is
backpropagated (through the o_proj, the softmax with RoPE and the causal mask, the MLP) to the
output y of every linear, giving g = J^T r with E[g g^T] = J^T J. With G2[t, i] = g_ti^2, the
output error the layer suffers from a weight change dW is approximately
    (2/N) sum_t sum_i G2[t, i] (dW_i x_t)^2  ~=  sum_i v_i dW_i A dW_i^T
with token weights w_t = sum_i G2[t, i], A = (2/N) sum_t w_t x_t x_t^T (the attention-aware
Hessian GPTQ uses for q/k/v) and output weights v_i = sum_t G2[t, i] / sum_t w_t.
Every linear's cost is then in one unit, the squared error at its decoder layer's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..calibrate import LayerView


@dataclass
class Curvature:
    A: torch.Tensor  # d_in x d_in, token-weighted 2/N X^T diag(w) X
    v: torch.Tensor  # d_out, output-dimension weights

    def cost(self, dW: torch.Tensor) -> float:
        dW = dW.to(self.A.device)
        return float((((dW @ self.A) * dW).sum(1) * self.v).sum())


def loss_gradients(model, windows: torch.Tensor, labels: Literal["data", "model"] = "data",
                   seed: int = 0) -> list[torch.Tensor]:
    """Gradient of the next-token loss with respect to every decoder layer's output, for each
    window: a list over layers of (n, L, hidden) tensors. Weighting a layer's output error with
    it (instead of a random r) puts every layer's cost in the unit of the model's loss.

    ``labels="data"``: the text's next tokens (empirical Fisher, follows the loss on text like
    the calibration's). ``labels="model"``: one next token per position drawn from the model's
    own distribution (seeded), so E[g g^T] is the true Fisher, the Hessian of the KL divergence
    from the unquantized model: for a small change d of a layer's output, sum over tokens of
    (g . d)^2 estimates twice the KL it causes."""
    from ..models import ModelAdapter

    if labels not in ("data", "model"):
        raise ValueError(f"labels must be 'data' or 'model', not {labels!r}")
    layers = ModelAdapter(model).layers
    dev = next(model.parameters()).device
    windows = windows.to(dev)
    outs: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            outs[i] = h
        return f

    grads = [torch.empty(windows.shape[0], windows.shape[1], model.config.hidden_size) for _ in layers]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in range(windows.shape[0]):
            with torch.enable_grad():
                emb = model.get_input_embeddings()(windows[w : w + 1]).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1].float()
                if labels == "model":
                    probs = logits.detach().softmax(-1).cpu()
                    target = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
                else:
                    target = windows[w, 1:]
                loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                loss.backward()
            for i in range(len(layers)):
                grads[i][w] = outs[i].grad[0].float().cpu()
            outs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    return grads


def layer_curvature(layer: LayerView, names: list[str], windows: int, seed: int = 0,
                    targets: list[torch.Tensor] | None = None) -> dict[str, Curvature]:
    """Curvature of each named linear of ``layer`` from its first ``windows`` input windows.
    The output direction r is random (Gauss-Newton of the layer output) or, with ``targets``
    (from ``loss_gradients``), the loss gradient at this layer's output (empirical Fisher)."""
    if targets is not None:
        windows = min(windows, targets[layer.index].shape[0])
    caps: dict[str, tuple] = {}

    def hook(name):
        def f(module, args, out):
            caps[name] = (args[0].detach(), out)
        return f

    handles = [layer.linears[n].register_forward_hook(hook(n)) for n in names]
    A, col, wsum, count = {}, {}, {}, {}
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919 * layer.index)
    try:
        for i in range(min(windows, len(layer.inputs))):
            x = layer.inputs[i].detach().to(layer.device).requires_grad_(True)
            with torch.enable_grad():
                out = layer.forward(x)
                if targets is not None:
                    r = targets[layer.index][i : i + 1].to(out)
                else:
                    r = torch.randn(out.shape, generator=gen).to(out)  # drawn on the CPU: same on any device
                grads = torch.autograd.grad(out, [caps[n][1] for n in names], grad_outputs=r, allow_unused=True)
            for n, g in zip(names, grads):
                xin = caps[n][0].reshape(-1, caps[n][0].shape[-1]).float()
                if g is None:
                    g2 = torch.zeros(xin.shape[0], layer.linears[n].out_features, device=xin.device)
                else:
                    g2 = g.reshape(-1, g.shape[-1]).float().pow(2)
                w = g2.sum(1)
                a = (xin * w[:, None]).T @ xin
                if n in A:
                    A[n] += a
                    col[n] += g2.sum(0)
                    wsum[n] += w.sum()
                    count[n] += xin.shape[0]
                else:
                    A[n], col[n], wsum[n], count[n] = a, g2.sum(0), w.sum(), xin.shape[0]
            caps.clear()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        total = float(wsum[n]) or 1.0
        out[n] = Curvature(A=A[n] * (2.0 / count[n]), v=col[n] / total)
    return out
