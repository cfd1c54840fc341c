"""The model-level check of a mask rebuild: KL divergence of the model's next-token
distribution from the dense model's, on held-out calibration windows, computed from one decoder
layer's inputs onward (the layers before it are already final, so their outputs are reused).

A block-local objective (the block's output MSE) can fall while the model's output gets worse:
later layers and the head weigh errors unevenly. ``ModelJudge`` lets a rebuild keep a block's
swaps only if the model's output moves toward the dense model's."""
from __future__ import annotations

import torch

from ..measure import kl_sum, logprobs
from ..models import ModelAdapter


class ModelJudge:
    def __init__(self, model, windows: torch.Tensor, dense: dict[str, torch.Tensor], chunk: int = 512):
        """``windows`` (n, L) token ids; ``dense`` the weights before pruning, by linear name
        (swapped in for one forward pass to get the reference log-probabilities)."""
        self.adapter, self.chunk = ModelAdapter(model), chunk
        self.ref = []
        saved = {}
        with torch.no_grad():
            try:
                for name, w in dense.items():
                    lin = model.get_submodule(name)
                    saved[name] = lin.weight.detach().clone()
                    lin.weight.copy_(w.to(lin.weight))
                for i in range(windows.shape[0]):
                    h = self.adapter.hidden_states(windows[i : i + 1].to(next(model.parameters()).device))[0]
                    self.ref.append([logprobs(self.adapter.head, h[c : c + chunk])
                                     for c in range(0, h.shape[0], chunk)])
            finally:
                for name, w in saved.items():
                    model.get_submodule(name).weight.copy_(w)

    def kl(self, start: int, inputs: list[torch.Tensor], kwargs: dict) -> float:
        """Mean KL(dense || model) per token, from decoder layer ``start``'s ``inputs`` (one per
        held-out window, in the order the windows were given)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for x, ref in zip(inputs, self.ref):
                h = x
                for layer in self.adapter.layers[start:]:
                    out = layer(h.to(next(layer.parameters()).device), **kwargs)
                    h = out[0] if isinstance(out, tuple) else out
                h = self.adapter.norm(h)[0]
                for c, r in zip(range(0, h.shape[0], self.chunk), ref):
                    lp = logprobs(self.adapter.head, h[c : c + self.chunk])
                    total += kl_sum(r, lp)
                    count += lp.shape[0]
        return total / count
