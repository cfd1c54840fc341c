"""The ``recover`` stage: heal a compressed model by distillation from the uncompressed one."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from .. import progress
from ..data import calibration_windows
from ..errors import PocketError
from ..models import layer_linears
from ..stages import Stage, register
from .. import hardware, memory
from . import distill, plan as planner
from .trainable import BlockGrid, GroupGrid, attach

DEFAULT_LR = {"full": 2e-4, "lora": 1e-3}


def parse_memory(text: str) -> int:
    from ..recipe import parse_bytes

    try:
        return parse_bytes(text)
    except PocketError:
        raise PocketError(f"memory '{text}' is not a size; write e.g. 2GiB or 1500MB") from None


@register
class Recover(Stage):
    method: Literal["recover"] = "recover"
    tokens: int = Field(200_000, ge=1, description="training tokens (calibration text only)")
    seq_len: int = Field(512, ge=8, description="tokens per training window")
    windows_per_step: int = Field(8, ge=1, description="windows per optimizer step")
    mode: Literal["full", "lora"] = Field("full", description="unquantized linears: tuned in full (masked) or by "
                                                              "LoRA masked before merging")
    rank: int = Field(16, ge=1, description="LoRA rank (mode: lora)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default 2e-4 full, 1e-3 lora)")
    grid_lr: float = Field(1e-3, gt=0, description="learning rate of quantization scales (relative change)")
    rounding: bool = Field(False, description="quantized linears: also train the rounding (a latent weight rounded "
                                              "to the grid, straight-through gradient): codes may change, still on "
                                              "their grid")
    optimizer: Literal["adamw", "adashift"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token cross-entropy added to the KL")
    memory: str | None = Field(None, description="memory budget (e.g. 2GiB): plan micro-batch and recomputation")
    state_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="optimizer state dtype")
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="autocast dtype of training; auto: bfloat16 where this CPU multiplies it fast, else float32")
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    norms: bool = Field(True, description="also tune the decoder layers' norm weights")
    text: str | None = Field(None, description="training text (default: the calibration text)")
    seed: int = 1
    loss_chunk: int = Field(256, ge=1, description="tokens whose logits are computed at once")
    checkpoint_every: int = Field(25, ge=1, description="steps between resumable checkpoints")
    state_file: str | None = Field(None, description="where the resumable checkpoint lives")
    recompute: bool = Field(True, description="false: keep the plan's micro-batch but recompute nothing "
                                              "(to measure what recomputation saves)")

    needs_teacher: ClassVar[bool] = True

    @field_validator("memory")
    @classmethod
    def _mem(cls, v):
        if v is not None:
            parse_memory(v)
        return v

    @model_validator(mode="after")
    def _state(self):
        if self.optimizer == "adamw" and self.state_dtype == "bfloat16":
            raise ValueError("bfloat16 optimizer state needs optimizer: adashift (AdamW keeps its moments in float32)")
        return self

    def _param_groups(self, tr, model, lr: float) -> list[dict]:
        """Grid scales (and offsets) train at ``grid_lr``, everything else (weights, latent
        weights, LoRA, norms) at ``lr``."""
        grid, rest = [], []
        for n, p in tr.named_parameters().items():
            owner = model.get_submodule(n.rsplit(".", 1)[0])
            scale = isinstance(owner, (GroupGrid, BlockGrid)) and not n.endswith(".latent")  # latent: a weight
            (grid if scale else rest).append(p)
        return [g for g in ({"params": rest, "lr": lr}, {"params": grid, "lr": self.grid_lr}) if g["params"]]

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.windows_per_step * self.seq_len)))

    def run(self, ctx) -> dict:
        teacher = getattr(ctx, "teacher", None)
        if teacher is None:
            raise PocketError("recover needs the uncompressed model as teacher: run it in a recipe after the "
                              "compression stages, or use `pocketlm recover DIR`")
        memory.return_freed_memory()
        if self.teacher_dtype == "bfloat16":
            teacher.to(torch.bfloat16)
        if ctx.tokenizer is None:
            raise PocketError("recover needs a tokenizer to read its training text")
        text = self.text or ctx.calibration.text
        n_windows = self.steps * self.windows_per_step
        windows = calibration_windows(ctx.tokenizer, n_windows, self.seq_len, text, self.seed)
        model = ctx.model
        tr = attach(model, layer_linears(model), ctx.quant, ctx.masks, self.mode, self.rank, norms=self.norms,
                    rounding=self.rounding)
        compute = hardware.compute_dtype(self.compute_dtype)
        n_train = tr.count()
        undo, plan = [], None
        if self.memory is not None:
            memory.trim()
            prof = planner.profile(model, self.seq_len, compute)
            sd = "float32" if self.optimizer == "adamw" else self.state_dtype
            plan = planner.make_plan(prof, parse_memory(self.memory), memory.rss(), n_train, self.windows_per_step,
                                     self.optimizer, sd, loss_chunk=self.loss_chunk,
                                     hint="shorten seq_len" + (", use mode: lora" if self.mode == "full" else "")
                                     + (", teacher_dtype: bfloat16" if self.teacher_dtype == "float32" else ""))
            for line in plan.lines():
                progress.console.print(line)
            undo = planner.apply(model, plan.states) if self.recompute else []
        micro = plan.micro_batch if plan else self.windows_per_step
        sdt = plan.state_dtype if plan else ("float32" if self.state_dtype == "auto" else self.state_dtype)
        lr = self.lr or DEFAULT_LR[self.mode]
        groups = self._param_groups(tr, model, lr)
        if not groups:
            raise PocketError("nothing to recover: every linear is frozen (K-quant super-blocks are not tuned)")
        cfg = distill.TrainConfig(
            steps=self.steps, windows_per_step=self.windows_per_step, micro_batch=micro, lr=lr,
            grid_lr=self.grid_lr, optimizer=self.optimizer, weight_decay=self.weight_decay,
            ce_weight=self.ce_weight, loss_chunk=plan.loss_chunk if plan else self.loss_chunk, compute_dtype=compute,
            state_dtype=torch.bfloat16 if sdt == "bfloat16" else None, checkpoint_every=self.checkpoint_every,
            state_file=self.state_file)
        try:
            log = distill.train(model, teacher, windows, groups, cfg, after_step=tr.enforce)
        finally:
            for u in undo:
                u()
        tr.finish(ctx.quant, ctx.masks)
        rep = {"tokens": self.steps * self.windows_per_step * self.seq_len, "steps": self.steps,
               "trained_params": n_train, "frozen_linears": len(tr.frozen), "seconds_training": round(log.seconds, 1),
               "resumed_from_step": log.resumed_from, "loss_first": log.loss[0] if log.loss else None,
               "loss_last": log.loss[-1] if log.loss else None, "peak_rss_bytes": log.peak_rss,
               "compute_dtype": "bfloat16" if compute is torch.bfloat16 else "float32",
               "curve": {"tokens": log.tokens, "loss": [round(x, 5) for x in log.loss]}}
        if plan is not None:
            rep["plan"] = plan.summary()
        return rep
