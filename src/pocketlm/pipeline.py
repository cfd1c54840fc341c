"""Run a recipe on a model, and write the result (atomically) with its manifest."""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__, memory, models, outdir
from .context import CalibrationConfig, Context
from .errors import PocketError
from .fsutil import atomic_dir
from .recipe import Recipe, resolve as resolve_recipe


@dataclass
class CompressionResult:
    model: nn.Module
    tokenizer: object
    recipe: Recipe
    context: Context
    seconds: float
    stages: list[dict] = field(default_factory=list)
    source: str | None = None
    eval: dict | None = None
    #: predicted peak resident bytes (by part) and the measured one, when the stages can predict
    memory: dict | None = None

    def manifest(self) -> dict:
        c = self.context
        calib = None
        if self.recipe.needs_calibration:
            cc = c.calibration
            calib = {"text": cc.text, "windows": int(c.windows().shape[0]), "seq_len": int(c.windows().shape[1]),
                     "seed": cc.seed}
        return {
            "pocketlm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": self.source,
            "recipe": self.recipe.name,
            "calibration": calib,
            "seconds": round(self.seconds, 2),
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "platform": platform.platform()},
            "size": c.size_report(),
            "stages": self.stages,
            "eval": self.eval,
            "memory": self.memory,
            "linears": {n: r.summary() for n, r in c.quant.items()},
        }

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the model (transformers directory, safetensors), the recipe, the quantizer's
        scales and zero points, ``pocketlm.json`` and ``report.html``; all or nothing."""
        stream = self.context.stream
        with atomic_dir(out, overwrite=overwrite) as tmp:
            if stream is None:
                models.save(self.model, self.tokenizer, tmp, masks=self.context.masks)
            else:  # the weights are already written, shard by shard
                self.model.config.save_pretrained(tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
                stream.move_weights(tmp)
            (tmp / outdir.RECIPE).write_text(self.recipe.to_yaml())
            if self.context.quant:
                tensors = {}
                for n, r in self.context.quant.items():
                    tensors.update(r.saved_tensors(n))
                save_file(tensors, str(tmp / outdir.QUANT))
            man = self.manifest()
            man["exports"] = self._exports(tmp)
            man["bytes_on_disk"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            outdir.write_manifest(tmp, man)
            from . import report  # matplotlib: imported only when a result is written

            run = report.Run(Path(out).name, tmp, man, self.model.config.num_hidden_layers)
            (tmp / outdir.REPORT).write_text(report.build([run], report.Anchors()), encoding="utf-8")
        if stream is not None:
            stream.close()
        return Path(out)

    def _exports(self, tmp: Path) -> dict:
        """Write the recipe's ``export`` targets inside the (temporary) output directory."""
        from .export import export_model

        done = {}
        src = None  # a GGUF source lends its tokenizer block as it is
        if self.source:
            where = models.resolve(self.source)
            src = where.describe() if where.kind == "gguf" else None
        for target in self.recipe.export:
            path = target.out_path(tmp)
            tensors = None
            if self.context.stream is not None:  # read back from the shards just moved in, one at a time
                from .stream import SafetensorsSource, streamed_tensors

                tensors = streamed_tensors(self.model, SafetensorsSource(tmp))
            rep = export_model(self.model, self.tokenizer, self.context.quant, target.format, path, target.type,
                               target.embed_type, source_gguf=src, source_dir=tmp, name=self.recipe.name,
                               tensors=tensors)
            done[str(path.relative_to(tmp))] = {"format": target.format, **rep}
        return done


def compress(model: "nn.Module | str", recipe: "Recipe | dict | str", tokenizer=None,
             calibration: "CalibrationConfig | torch.Tensor | None" = None, device: str = "cpu",
             after_stage=None, stream: "str | Path | None" = None) -> CompressionResult:
    """Compress ``model`` in place with ``recipe`` (a Recipe, dict, preset name or YAML path);
    the result's ``model`` is the compressed one (a new object when a stage rewrites the
    architecture, e.g. ``sliding-window`` on a Llama model).

    ``model`` may be a loaded transformers model or a model spec (then it is loaded).
    ``calibration`` is a CalibrationConfig, or a tensor of token windows (n, L) to use as is.
    ``after_stage(result)``, if given, sees the result after every stage but the last (to
    measure a pipeline's intermediate models, e.g. a pruned model before its mask rebuild).
    ``stream``: a work directory; the model (a spec) is then streamed layer by layer from its
    safetensors files, never whole in memory, each stage's layers written there with a journal;
    a work directory holding a journal resumes that run.
    """
    source = None
    recipe = resolve_recipe(recipe)
    streamer = None
    if stream is not None:
        if not isinstance(model, str):
            raise PocketError("a streamed run loads the model itself: pass its spec (a model directory or hub id)")
        from .stream import open_streamed

        source = model
        model, tokenizer, _, streamer = open_streamed(model, stream, device=device)
        check_streamable(recipe, model)
    elif isinstance(model, str):
        source = model
        model, tokenizer, _ = models.load(model, device=device)
    for target in recipe.export:
        target.check(model.config, recipe.stages)
    ctx = Context(model=model, tokenizer=tokenizer, device=device, stream=streamer,
                  keep_dense=any(s.needs_dense_weights for s in recipe.stages))
    if any(s.needs_teacher for s in recipe.stages):
        ctx.teacher = copy.deepcopy(model).requires_grad_(False)
    if isinstance(calibration, torch.Tensor):
        ctx.calib_windows = calibration
    elif calibration is not None:
        ctx.calibration = calibration
    predicted = _predict_memory(ctx, recipe, streamer is not None)
    reports: list[dict] = []
    if streamer is not None:
        streamer.records, streamer.restore_records = (lambda: ctx.quant), ctx.restore_records
        streamer.restore_run()
        reports = streamer.reports
    for k, stage in enumerate(recipe.stages):
        if k < len(reports):  # finished by a stopped run this one resumes
            continue
        ts = time.perf_counter()
        rep = stage.run(ctx) or {}
        reports.append({"method": stage.method, "seconds": round(time.perf_counter() - ts, 2), **rep})
        if streamer is not None:
            streamer.finish_stage()
        if after_stage is not None and k + 1 < len(recipe.stages):
            part = recipe.model_copy(update={"stages": recipe.stages[: k + 1]})
            after_stage(CompressionResult(ctx.model, tokenizer, part, ctx, _spent(reports), list(reports), source))
    if predicted is not None:
        predicted["measured_peak_bytes"] = memory.peak()
    return CompressionResult(ctx.model, tokenizer, recipe, ctx, _spent(reports), reports, source, memory=predicted)


def _predict_memory(ctx: Context, recipe: Recipe, streamed: bool) -> dict | None:
    """The predicted peak of a recipe whose stages all say what they need (None otherwise). The
    process part is measured once the calibration windows are drawn, without the weights loaded
    so far: the tokenizer, the windows and what loading left behind are in it."""
    from .footprint import loaded_bytes, predict_peak

    if not recipe.needs_calibration or any(s.memory_bytes({}) is None for s in recipe.stages):
        return None
    n, seq_len = ctx.windows().shape
    memory.trim()
    base = max(0, memory.rss() - loaded_bytes(ctx.model))
    return predict_peak(ctx.model, n, seq_len, recipe.stages, streamed, ctx.calibration.offload, base)


def check_streamable(recipe: Recipe, skeleton: nn.Module) -> None:
    """Refuse, before any work, a recipe a streamed model cannot run (saying what memory the
    in-memory run needs instead)."""
    need = sum(p.numel() * p.element_size() for p in skeleton.parameters()) / 2**30
    for s in recipe.stages:
        why = s.stream_blocker()
        if why:
            raise PocketError(f"stage '{s.method}' cannot run on a streamed model: {why}; streaming runs gptq and "
                              f"imatrix (the others need the model loaded whole, without --stream: {need:.1f} GiB "
                              "of weights plus the method's working memory)")
    if any(t.format != "gguf" for t in recipe.export):
        raise PocketError("a streamed run exports GGUF only (tensor by tensor); drop the compressed-tensors export "
                          "and run `pocketlm export OUT --format compressed-tensors` on a machine that holds the model")


def _spent(reports: list[dict]) -> float:
    return sum(r["seconds"] for r in reports)
