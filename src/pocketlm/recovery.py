"""Recover a saved compressed model (``pocketlm recover DIR``): load it with its masks and
quantization records, load the model it was compressed from as teacher, run the ``recover``
stage, and write a new output directory (its exports re-written with the tuned codes)."""
from __future__ import annotations

import time
from pathlib import Path

from . import models, outdir, sparse
from .context import CalibrationConfig, Context
from .errors import PocketError
from .export.saved import quant_records
from .pipeline import CompressionResult
from .recipe import from_dict, from_yaml


def load_compressed(model_dir: str | Path) -> tuple[dict, object]:
    """(pocketlm.json, the recipe that made it) of a pocketlm output directory."""
    man = outdir.manifest(model_dir)
    if man is None:
        raise PocketError(f"{model_dir} is not a pocketlm output (no pocketlm.json); compress a model first")
    rec_file = Path(model_dir) / outdir.RECIPE
    recipe = from_yaml(rec_file) if rec_file.is_file() else from_dict({"name": "unknown", "stages": []})
    return man, recipe


def recover(model_dir: str, stage, teacher: str | None = None, eval_windows: int = 4,
            eval_len: int = 2048) -> CompressionResult:
    """Run ``stage`` (a ``Recover``) on the compressed model in ``model_dir``."""
    from .measure import perplexity

    man, recipe = load_compressed(model_dir)
    spec = teacher or man.get("source")
    if not spec:
        raise PocketError(f"{model_dir} does not say what it was compressed from; pass --teacher MODEL")
    try:
        models.load_config(spec)
    except PocketError as e:
        raise PocketError(f"the teacher {spec} cannot be read ({e}); pass --teacher MODEL") from None
    student, tok, _ = models.load(model_dir)
    ctx = Context(model=student, tokenizer=tok)
    ctx.quant = quant_records(model_dir)
    mask_file = Path(model_dir) / outdir.SPARSE
    ctx.masks = sparse.masks(mask_file) if mask_file.is_file() else {}
    calib = man.get("calibration") or {}
    ctx.calibration = CalibrationConfig(text=calib.get("text") or CalibrationConfig().text)
    ctx.teacher = models.load(spec)[0].requires_grad_(False)
    t0 = time.perf_counter()
    rep = stage.run(ctx)
    seconds = time.perf_counter() - t0
    stages = [*man.get("stages", []), {"method": stage.method, "seconds": round(seconds, 2), **rep}]
    new = recipe.model_copy(update={"name": f"{recipe.name}+recover", "stages": [*recipe.stages, stage]})
    res = CompressionResult(ctx.model, tok, new, ctx, man.get("seconds", 0) + seconds, stages, source=spec)
    if eval_windows > 0:
        res.eval = perplexity(ctx.model, tok, "wikitext2", eval_len, eval_windows, reference=ctx.teacher).to_dict()
    return res
