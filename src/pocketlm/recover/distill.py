"""The distillation loop: the compressed model (student) learns the uncompressed model's
(teacher's) next-token distribution on calibration text.

loss = KL(p_teacher || p_student) per token (+ ``ce_weight`` x next-token cross-entropy),
averaged over the tokens of an optimizer step. The teacher runs alongside (no gradient); the
head and loss are computed in chunks of tokens and recomputed in the backward pass, so the
full vocabulary's logits of a whole window never sit in memory. Every ``checkpoint_every``
steps the trained tensors, the optimizer and the step are written atomically; a run started
with the same settings and the same state file resumes there and ends where an uninterrupted
run ends.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import progress
from ..errors import PocketError
from .. import memory


@dataclass
class TrainConfig:
    steps: int
    windows_per_step: int
    micro_batch: int
    lr: float
    grid_lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup: float = 0.05
    ce_weight: float = 0.0
    loss_chunk: int = 256
    compute_dtype: torch.dtype | None = torch.bfloat16
    state_dtype: torch.dtype | None = None
    adashift_n: int = 10
    checkpoint_every: int = 25
    state_file: Path | None = None
    stop_after: int | None = None  # (tests) return after this many steps, as if killed

    def fingerprint(self, windows: torch.Tensor) -> str:
        skip = ("state_file", "stop_after", "checkpoint_every")
        keys = {k: str(v) for k, v in self.__dict__.items() if k not in skip}
        h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
        h.update(windows.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    peak_rss: int = 0


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adashift":
        from .adashift import AdaShift

        return AdaShift(groups, lr=cfg.lr, n=cfg.adashift_n, weight_decay=cfg.weight_decay,
                        state_dtype=cfg.state_dtype)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to 10%."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1, total - w)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def _chunk_loss(student_head: nn.Module, teacher_head: nn.Module, hs: torch.Tensor, ht: torch.Tensor,
                targets: torch.Tensor, ce_weight: float, dtype) -> torch.Tensor:
    """Summed per-token loss of one chunk of final hidden states (student hs, teacher ht)."""
    with _autocast(dtype):
        ls = student_head(hs)
    ls = ls.float().log_softmax(-1)
    with torch.no_grad(), _autocast(dtype):
        lt = teacher_head(ht)
    lt = lt.float().log_softmax(-1)
    loss = (lt.exp() * (lt - ls)).sum()
    if ce_weight:
        loss = loss + ce_weight * F.nll_loss(ls.view(-1, ls.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss


def train(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, groups: list[dict], cfg: TrainConfig,
          after_step=None) -> TrainLog:
    """Train ``groups`` (parameter groups of ``student``) for ``cfg.steps`` optimizer steps of
    ``cfg.windows_per_step`` windows each; ``after_step()`` runs after every step (masks)."""
    opt = make_optimizer(groups, cfg)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]
    names = {id(p): n for n, p in student.named_parameters()}
    fp = cfg.fingerprint(windows)
    start, log = _resume(cfg.state_file, fp, params, names, opt)
    tokens_per_step = cfg.windows_per_step * windows.shape[1]
    memory.reset_peak()
    t0 = time.perf_counter() - log.seconds
    with progress.bar("recovering", cfg.steps) as advance:
        advance(start)
        for step in range(start, cfg.steps):
            f = lr_factor(step, cfg.steps, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            batch = windows[(step * cfg.windows_per_step + torch.arange(cfg.windows_per_step)) % windows.shape[0]]
            n_tok = batch.shape[0] * (batch.shape[1] - 1)
            total = sum(_backward(mb, n_tok, student, teacher, cfg) for mb in batch.split(cfg.micro_batch))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            log.steps.append(step + 1)
            log.tokens.append((step + 1) * tokens_per_step)
            log.loss.append(total / n_tok)
            log.lr.append(opt.param_groups[0]["lr"])
            log.seconds = time.perf_counter() - t0
            log.peak_rss = max(log.peak_rss, memory.peak())
            advance(1, f"loss {total / n_tok:.4f}")
            last = step + 1 == cfg.steps
            if cfg.state_file is not None and not last and (step + 1) % cfg.checkpoint_every == 0:
                _save_state(cfg.state_file, fp, step + 1, params, names, opt, log)
            if cfg.stop_after is not None and step + 1 >= cfg.stop_after and not last:
                return log
    if cfg.state_file is not None and Path(cfg.state_file).is_file():
        Path(cfg.state_file).unlink()
    return log


def _backward(mb: torch.Tensor, n_tok: int, student: nn.Module, teacher: nn.Module, cfg: TrainConfig) -> float:
    """One micro-batch: both models' final hidden states, the loss chunk by chunk (each chunk's
    logits recomputed in the backward pass), its gradient accumulated; returns the summed loss."""
    with torch.no_grad(), _autocast(cfg.compute_dtype):
        ht = teacher.get_decoder()(input_ids=mb, use_cache=False).last_hidden_state
    with _autocast(cfg.compute_dtype):
        hs = student.get_decoder()(input_ids=mb, use_cache=False).last_hidden_state
    hs, ht, tgt = hs[:, :-1], ht[:, :-1], mb[:, 1:]
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    step = max(1, cfg.loss_chunk // mb.shape[0])
    loss = hs.new_zeros((), dtype=torch.float32)
    for c in range(0, hs.shape[1], step):
        sl = slice(c, c + step)
        loss = loss + checkpoint(_chunk_loss, s_head, t_head, hs[:, sl], ht[:, sl], tgt[:, sl], cfg.ce_weight,
                                 cfg.compute_dtype, use_reentrant=False)
    (loss / n_tok).backward()
    return float(loss.detach())


def _resume(state_file: Path | None, fp: str, params, names, opt) -> tuple[int, "TrainLog"]:
    """The step to start from: a checkpoint written by a run with the same fingerprint restores
    the trained tensors, the optimizer and the log; otherwise step 0."""
    if state_file is None or not Path(state_file).is_file():
        return 0, TrainLog()
    try:
        st = torch.load(state_file, weights_only=True)  # tensors and plain containers only
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise PocketError(f"cannot read the recovery state {state_file} ({type(e).__name__}); "
                          "delete it to start the recovery afresh") from None
    if st.get("fingerprint") != fp:
        return 0, TrainLog()
    with torch.no_grad():
        for p in params:
            p.copy_(st["params"][names[id(p)]])
    opt.load_state_dict(st["optimizer"])
    log = TrainLog(**st["log"])
    log.resumed_from = st["step"]
    return st["step"], log


def _save_state(path: Path, fp: str, step: int, params, names, opt, log: TrainLog) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"fingerprint": fp, "step": step, "params": {names[id(p)]: p.detach().clone() for p in params},
                "optimizer": opt.state_dict(), "log": asdict(log)}, tmp)
    os.replace(tmp, path)
