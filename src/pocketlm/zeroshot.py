"""Zero-shot multiple choice: HellaSwag (Zellers et al., ACL 2019).

Protocol of lm-evaluation-harness's ``hellaswag`` task: each ending is scored by the summed
log-likelihood of its tokens given the context (the context and " " + ending tokenized apart and
joined); ``acc`` takes the ending with the highest sum, ``acc_norm`` the highest sum divided by
the ending's length in bytes. Standard errors are the sample standard deviation of the 0/1
outcomes over sqrt(n). The same scoring runs on a PyTorch model and on a GGUF file in
llama.cpp (its own logits), so the two can be compared task by task.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from . import progress
from .data import bos_id
from .errors import PocketError

TASKS = {"hellaswag": "hellaswag_val_full.txt"}


@dataclass
class Task:
    context: str
    label: int
    endings: list[str]


@dataclass
class ZeroShotResult:
    task: str
    tasks: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    seconds: float
    rule: str = "lm-eval: sum log-likelihood (acc), per byte of the ending (acc_norm)"
    #: per task: 1 if acc_norm picked the gold ending (for paired comparisons)
    correct_norm: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_tasks(name: str = "hellaswag", limit: int | None = None, path: str | Path | None = None) -> list[Task]:
    """The first ``limit`` tasks of the bundled HellaSwag validation file (or ``path``: the
    same 6-lines-per-task layout llama.cpp's ``--hellaswag`` reads)."""
    if path is None:
        if name not in TASKS:
            raise PocketError(f"unknown task '{name}'; use one of: {', '.join(TASKS)}")
        path = resources.files("pocketlm") / "datasets" / TASKS[name]
    lines = Path(str(path)).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise PocketError(f"{path} is not in the 6-lines-per-task layout (context, label, 4 endings)")
    tasks = []
    for i in range(0, len(lines), 6):
        if limit is not None and len(tasks) >= limit:
            break
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise PocketError(f"{path}, line {i + 2}: the gold label must be 0-3, got {label!r}")
        tasks.append(Task(lines[i], int(label), lines[i + 2 : i + 6]))
    return tasks


def encode(tokenizer, task: Task) -> tuple[list[int], list[list[int]]]:
    """Context tokens (BOS first when the tokenizer adds one) and each ending's tokens."""
    ctx = tokenizer(task.context, add_special_tokens=False).input_ids
    bos = bos_id(tokenizer)
    if bos is not None:
        ctx = [bos, *ctx]
    return ctx, [tokenizer(" " + e, add_special_tokens=False).input_ids for e in task.endings]


class TorchChoices:
    """Summed log-likelihood of each continuation: the context runs once and its keys and values
    are cached; the continuations then run from that cache as one right-padded batch (causal
    attention: padding after a sequence cannot change it); the head is applied only where a
    continuation token is predicted."""

    def __init__(self, model):
        from .models import ModelAdapter

        self.adapter = ModelAdapter(model)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def loglik(self, ctx: list[int], conts: list[list[int]]) -> list[float]:
        dec = self.adapter.decoder
        first = dec(input_ids=torch.tensor([ctx], device=self.device), use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(conts))
        ids = torch.zeros(len(conts), max(map(len, conts)), dtype=torch.long)
        for i, c in enumerate(conts):
            ids[i, : len(c)] = torch.tensor(c)
        rest = dec(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True).last_hidden_state
        last = first.last_hidden_state[0, -1:]  # predicts each continuation's first token
        out = []
        for i, c in enumerate(conts):
            h = torch.cat([last, rest[i, : len(c) - 1]])
            lp = F.log_softmax(self.adapter.head(h).float(), dim=-1).cpu()
            out.append(float(lp[torch.arange(len(c)), torch.tensor(c)].sum()))
        return out


class LlamaCppChoices:
    """The same from llama.cpp's logits of a GGUF file: the context is evaluated once per task,
    and each ending continues from its cached keys and values."""

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = 512):
        from .runtime.llamacpp import load

        self.llm = load(path, n_ctx=n_ctx, threads=threads)

    def loglik(self, ctx: list[int], conts: list[list[int]]) -> list[float]:
        import numpy as np

        out = []
        self.llm.reset()
        self.llm.eval(ctx)
        for c in conts:
            self.llm.n_tokens = len(ctx)  # eval() drops the cache past this point first
            self.llm.eval(c)
            logits = torch.from_numpy(np.asarray(self.llm.scores[len(ctx) - 1 : len(ctx) - 1 + len(c)],
                                                 dtype=np.float32).copy())
            out.append(float(F.log_softmax(logits, dim=-1)[torch.arange(len(c)), torch.tensor(c)].sum()))
        return out


def _stderr(hits: list[int]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def evaluate(scorer, tokenizer, tasks: list[Task], name: str = "hellaswag") -> ZeroShotResult:
    """acc and acc_norm of ``scorer`` (TorchChoices or LlamaCppChoices) on ``tasks``."""
    t0 = time.perf_counter()
    acc, norm = [], []
    with progress.bar(name, len(tasks)) as advance:
        for task in tasks:
            ctx, conts = encode(tokenizer, task)
            ll = scorer.loglik(ctx, conts)
            per_byte = [v / len(e.encode("utf-8")) for v, e in zip(ll, (" " + e for e in task.endings))]
            acc.append(int(max(range(4), key=ll.__getitem__) == task.label))
            norm.append(int(max(range(4), key=per_byte.__getitem__) == task.label))
            advance()
    n = len(tasks)
    return ZeroShotResult(name, n, sum(acc) / n, _stderr(acc), sum(norm) / n, _stderr(norm),
                          time.perf_counter() - t0, correct_norm=norm)
