"""The model-level check of a mask rebuild: KL divergence of the model's next-token
distribution from the dense model's, on held-out calibration windows, computed from one decoder
layer's inputs onward (the layers before it are already final, so their outputs are reused).

A block-local objective (the block's output MSE) can fall while the model's output gets worse:
later layers and the head weigh errors unevenly. ``ModelJudge`` lets a rebuild keep a block's
swaps only if the model's output moves toward the dense model's, by more than the noise of the
held-out windows: ``better`` compares two measurements chunk by chunk (paired) and asks for a
mean decrease of at least ``margin`` standard errors."""
from __future__ import annotations

import torch

from ..measure import kl_sum, logprobs
from ..models import ModelAdapter


class ModelJudge:
    def __init__(self, model, windows: torch.Tensor, dense: dict[str, torch.Tensor], pieces: int = 8,
                 margin: float = 2.0):
        """``windows`` (n, L) token ids; ``dense`` the weights before pruning, by linear name
        (swapped in for one forward pass to get the reference log-probabilities); KL is kept per
        chunk of L / ``pieces`` consecutive tokens, the unit of the paired comparison."""
        chunk = max(1, -(-windows.shape[1] // pieces))
        self.adapter, self.chunk, self.margin = ModelAdapter(model), chunk, margin
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
        #: tokens per chunk, in the order ``kl`` returns them
        self.counts = torch.tensor([r.shape[0] for ref in self.ref for r in ref], dtype=torch.float64)

    def kl(self, start: int, inputs: list[torch.Tensor], kwargs: list[dict]) -> torch.Tensor:
        """Mean KL(dense || model) per token of each chunk, from decoder layer ``start``'s
        ``inputs`` (one per held-out window, in the order the windows were given); ``kwargs``
        the keyword arguments of every layer, by index."""
        out = []
        with torch.no_grad():
            for x, ref in zip(inputs, self.ref):
                h = x
                for k in range(start, len(self.adapter.layers)):
                    layer = self.adapter.layers[k]
                    o = layer(h.to(next(layer.parameters()).device), **kwargs[k])
                    h = o[0] if isinstance(o, tuple) else o
                h = self.adapter.norm(h)[0]
                for c, r in zip(range(0, h.shape[0], self.chunk), ref):
                    lp = logprobs(self.adapter.head, h[c : c + self.chunk])
                    out.append(kl_sum(r, lp) / lp.shape[0])
        return torch.tensor(out, dtype=torch.float64)

    def mean(self, chunks: torch.Tensor) -> float:
        """The per-token mean KL of a ``kl`` result."""
        return float((chunks * self.counts).sum() / self.counts.sum())

    def better(self, new: torch.Tensor, old: torch.Tensor) -> bool:
        """Is ``new`` (per-chunk KL) lower than ``old`` by at least ``margin`` standard errors of
        the paired chunk differences? (``margin`` 0: any decrease.)"""
        d = new - old
        se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
        return float(d.mean()) < -self.margin * se
