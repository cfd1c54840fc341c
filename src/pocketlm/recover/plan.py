"""Planning a recovery run to a memory budget (the idea of Melon, Wang et al., MobiSys 2022:
profile what each part of the network keeps for the backward pass, then recompute first what
frees the most memory per unit of recomputation time, until the peak fits).

The profile is one forward pass at one window of the training length: for every decoder layer,
the bytes its attention block, its MLP block and the rest of the layer save for backward
(measured with saved-tensor hooks, not kept), their inputs' bytes (what a recomputed block keeps
instead) and their forward times (the recomputation cost). Activations scale with the
micro-batch. The rest of the peak is counted from the model: what is resident now (weights of
the student and the teacher), gradients and optimizer state of the trained parameters, and the
transient peaks of the backward pass and of the chunked distillation loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PocketError
from .. import memory

STATES = ("none", "mlp", "attention", "blocks", "layer")  # what a layer recomputes
HEADROOM = 0.03  # of the budget, left free for what the count cannot see (allocator rounding, small tensors)
MiB = 2**20


@dataclass
class LayerProfile:
    saved: dict[str, int]  # per window: bytes kept for backward by attention, mlp, the rest ("glue")
    inputs: dict[str, int]  # per window: bytes of the inputs of attention, mlp, the whole layer
    seconds: dict[str, float]  # forward time of attention, mlp, the whole layer

    def kept(self, state: str) -> int:
        s, i = self.saved, self.inputs
        attn = i["attention"] if state in ("attention", "blocks") else s["attention"]
        mlp = i["mlp"] if state in ("mlp", "blocks") else s["mlp"]
        return i["layer"] if state == "layer" else s["glue"] + attn + mlp

    def cost(self, state: str) -> float:
        t = self.seconds
        return {"none": 0.0, "mlp": t["mlp"], "attention": t["attention"], "blocks": t["attention"] + t["mlp"],
                "layer": t["layer"]}[state]

    def largest(self) -> int:
        return self.kept("none")


@dataclass
class Profile:
    layers: list[LayerProfile]
    seq_len: int
    hidden: int
    vocab: int
    scale: float = 1.0  # real resident bytes per hooked byte (see _calibrate)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.dtype)


def profile(model: nn.Module, seq_len: int, compute_dtype: torch.dtype | None = torch.bfloat16) -> Profile:
    """Measure one forward of ``model`` (being trained) on one window of ``seq_len`` tokens."""
    decoder = model.get_decoder()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    current: list[str] = []
    held: dict[str, dict] = {}
    timing: dict[str, float] = {}
    inputs: dict[str, int] = {}

    def pack(t):
        if current and t.untyped_storage().data_ptr() not in params:
            held.setdefault(current[-1], {})[_storage_key(t)] = t.untyped_storage().nbytes()
        return None

    def arg_bytes(args, kwargs):
        ts = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        ts += [x for v in kwargs.values() if isinstance(v, tuple) for x in v if isinstance(x, torch.Tensor)]
        return sum(t.untyped_storage().nbytes() for t in ts)

    layers = list(decoder.layers)
    result: list[LayerProfile] = []
    hooks = []
    for li, layer in enumerate(layers):
        parts = {"layer": layer, "attention": layer.self_attn, "mlp": layer.mlp}
        for kind, mod in parts.items():
            def pre(m, args, kwargs, kind=kind, li=li):
                current.append(kind)
                inputs[f"{li}.{kind}"] = arg_bytes(args, kwargs)
                timing[f"{li}.{kind}"] = -time.perf_counter()

            def post(m, args, kwargs, out, kind=kind, li=li):
                timing[f"{li}.{kind}"] += time.perf_counter()
                current.pop()
            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(mod.register_forward_hook(post, with_kwargs=True))

        def done(m, args, kwargs, out, li=li):
            saved = {k: sum(v.values()) for k, v in held.items()}
            glue = saved.get("layer", 0)
            result.append(LayerProfile(
                saved={"attention": saved.get("attention", 0), "mlp": saved.get("mlp", 0), "glue": glue},
                inputs={k: inputs[f"{li}.{k}"] for k in ("attention", "mlp", "layer")},
                seconds={k: max(timing[f"{li}.{k}"], 1e-6) for k in ("attention", "mlp", "layer")}))
            held.clear()
        hooks.append(layer.register_forward_hook(done, with_kwargs=True))
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            ctx = torch.autocast("cpu", dtype=compute_dtype) if compute_dtype else _Null()
            with ctx:
                h = decoder(input_ids=ids, use_cache=False).last_hidden_state
        del h
    finally:
        for hk in hooks:
            hk.remove()
    cfg = model.config
    prof = Profile(result, seq_len, cfg.hidden_size, cfg.vocab_size)
    _calibrate(prof, decoder, compute_dtype, min(seq_len, 128))
    return prof


def _calibrate(prof: Profile, decoder: nn.Module, compute_dtype, length: int) -> None:
    """Scale the hooked byte counts to what a real forward keeps resident (autograd keeps a few
    tensors the hooks do not see; the allocator rounds): one forward of ``length`` tokens whose
    graph is kept, its resident growth against the count, the ratio bounded to [1, 2]."""
    counted = sum(lp.kept("none") for lp in prof.layers) * length / prof.seq_len
    ids = torch.randint(0, prof.vocab, (1, length))
    before = memory.rss()
    with torch.enable_grad(), (torch.autocast("cpu", dtype=compute_dtype) if compute_dtype else _Null()):
        h = decoder(input_ids=ids, use_cache=False).last_hidden_state
    grown = memory.rss() - before
    del h
    if not before or counted <= 0:
        return
    ratio = min(2.0, max(1.0, grown / counted))
    for lp in prof.layers:
        lp.saved = {k: int(v * ratio) for k, v in lp.saved.items()}
    prof.scale = ratio


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@dataclass
class Plan:
    micro_batch: int
    seq_len: int
    states: list[str]  # per decoder layer: what it recomputes
    state_dtype: str
    parts: dict[str, int] = field(default_factory=dict)
    recompute_seconds: float = 0.0  # per micro-batch
    max_batch_without_recompute: int = 0
    max_batch_with_recompute: int = 0
    profile_scale: float = 1.0
    loss_chunk: int = 256

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def summary(self) -> dict:
        counts = {s: self.states.count(s) for s in STATES if self.states.count(s)}
        return {"micro_batch": self.micro_batch, "seq_len": self.seq_len, "recompute": counts,
                "optimizer_state_dtype": self.state_dtype, "predicted_peak_bytes": self.peak,
                "parts_bytes": dict(self.parts), "recompute_seconds_per_micro_batch": round(self.recompute_seconds, 3),
                "max_micro_batch_without_recompute": self.max_batch_without_recompute,
                "max_micro_batch_with_recompute": self.max_batch_with_recompute,
                "profile_scale": round(self.profile_scale, 3), "loss_chunk": self.loss_chunk}

    def lines(self) -> list[str]:
        s = self.summary()
        parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in self.parts.items())
        return [f"plan: micro-batch {self.micro_batch} x {self.seq_len} tokens, recompute {s['recompute']}, "
                f"optimizer state {self.state_dtype}, logits of {self.loss_chunk} tokens at once",
                f"predicted peak {self.peak / MiB:.0f} MiB ({parts} MiB)",
                f"largest micro-batch: {self.max_batch_without_recompute} without recompute, "
                f"{self.max_batch_with_recompute} with it"]


def optimizer_state_bytes(optimizer: str, n_params: int, state_bytes: int, adashift_n: int = 10) -> int:
    """AdamW keeps two moments per parameter; AdaShift keeps its last n gradients (v is one
    value per tensor with phi = max)."""
    per = 2 if optimizer == "adamw" else adashift_n + 1
    return per * n_params * state_bytes


def static_parts(resident: int, n_trainable: int, optimizer: str, state_dtype: str, adashift_n: int) -> dict[str, int]:
    sb = 2 if state_dtype == "bfloat16" else 4
    return {"resident": resident, "gradients": 4 * n_trainable,
            "optimizer": optimizer_state_bytes(optimizer, n_trainable, sb, adashift_n)}


def activation_parts(prof: Profile, states: list[str], micro: int, loss_chunk: int) -> dict[str, int]:
    L, h, V = prof.seq_len, prof.hidden, prof.vocab
    kept = sum(lp.kept(s) for lp, s in zip(prof.layers, states))
    # backward: one layer's full activations when it is recomputed, and the gradients flowing
    # through the residual stream (a few hidden-sized tensors)
    recompute = max((lp.largest() for lp, s in zip(prof.layers, states) if s != "none"), default=0)
    chunk = min(loss_chunk, micro * L)
    return {"activations": micro * (kept + 2 * L * h * 4),  # + embedding output and final hidden
            "backward": micro * (recompute + 4 * L * h * 4),
            "loss": chunk * V * 4 * 6,  # student and teacher logits, log-probs, probs, gradient
            "teacher": micro * L * h * 2}


def make_plan(prof: Profile, budget: int, resident: int, n_trainable: int, batch: int, optimizer: str = "adamw",
              state_dtype: str = "auto", adashift_n: int = 10, loss_chunk: int = 256,
              hint: str = "shorten seq_len") -> Plan:
    """The largest micro-batch (a divisor of ``batch``) that fits ``budget``, recomputing as
    little as possible: layers move to recompute states in the order of most bytes freed per
    second of recomputation. Raises with the smallest budget that would fit when none does."""
    dtypes = ["float32", "bfloat16"] if state_dtype == "auto" else [state_dtype]
    n = len(prof.layers)
    best_small = None
    for dt in dtypes:
        static = static_parts(resident, n_trainable, optimizer, dt, adashift_n)
        base = sum(static.values())
        chunks = [c for c in (loss_chunk, loss_chunk // 2, loss_chunk // 4, loss_chunk // 8) if c >= 32] or [loss_chunk]
        fits = {}
        for micro in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
            for chunk in chunks:  # fewer logits at once first: it costs no recomputation
                states = _fit_states(prof, int(budget * (1 - HEADROOM)) - base, micro, chunk)
                if states is not None:
                    fits[micro] = (states, chunk)
                    break
        if not fits:
            parts = {**static, **activation_parts(prof, ["layer"] * n, 1, chunks[-1])}
            need = sum(parts.values())
            best_small = need if best_small is None else min(best_small, need)
            continue
        micro = max(fits)
        states, chunk = fits[micro]
        plan = Plan(micro, prof.seq_len, states, dt, {**static, **activation_parts(prof, states, micro, chunk)})
        plan.loss_chunk = chunk
        plan.recompute_seconds = micro * sum(lp.cost(s) for lp, s in zip(prof.layers, states))
        plan.max_batch_with_recompute = micro
        plan.profile_scale = prof.scale
        plan.max_batch_without_recompute = max((m for m, (s, _) in fits.items() if all(x == "none" for x in s)),
                                               default=0)
        return plan
    raise PocketError(f"no plan fits {budget / MiB:.0f} MiB: the smallest needs about {best_small / MiB:.0f} MiB "
                      f"(micro-batch 1, every layer recomputed); raise --memory or {hint}")


def _fit_states(prof: Profile, room: int, micro: int, loss_chunk: int) -> list[str] | None:
    """Greedy (Melon's rule): starting from no recomputation, repeatedly take the layer move
    that frees the most activation bytes per second of recomputation, until the peak fits."""
    states = ["none"] * len(prof.layers)

    def need(st):
        return sum(activation_parts(prof, st, micro, loss_chunk).values())

    while need(states) > room:
        best, best_ratio = None, -1.0
        for i, lp in enumerate(prof.layers):
            cur_kept, cur_cost = lp.kept(states[i]), lp.cost(states[i])
            for s in STATES:
                freed, extra = cur_kept - lp.kept(s), lp.cost(s) - cur_cost
                if freed <= 0:
                    continue
                ratio = freed / max(extra, 1e-9)
                if ratio > best_ratio:
                    best, best_ratio = (i, s), ratio
        if best is None:
            return None
        states[best[0]] = best[1]
    return states


def apply(model: nn.Module, states: list[str]) -> list:
    """Make the planned modules recompute their activations in the backward pass (activation
    checkpointing of that module's forward); returns undo callables."""
    from torch.utils.checkpoint import checkpoint

    undo = []

    def wrap(mod):
        orig = mod.forward

        def forward(*args, **kwargs):
            return checkpoint(orig, *args, use_reentrant=False, **kwargs)
        mod.forward = forward
        undo.append(lambda m=mod: m.__dict__.pop("forward", None))

    for layer, state in zip(model.get_decoder().layers, states):
        if state == "layer":
            wrap(layer)
        if state in ("attention", "blocks"):
            wrap(layer.self_attn)
        if state in ("mlp", "blocks"):
            wrap(layer.mlp)
    return undo
