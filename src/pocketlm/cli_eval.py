"""`pocketlm eval`: perplexity (standard protocol, optionally KL and top-1 against a reference),
zero-shot accuracy, in transformers, in llama.cpp, or streamed layer by layer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_common import _check, _local_inputs
from .errors import PocketError
from .fsutil import check_output


def _warn_context(config, seq_len: int) -> None:
    """One line on stderr when a window is longer than the context the model's rope base supports."""
    from . import rope

    r = rope.report(config)
    if seq_len > r["supported_context"]:
        typer.echo(f"warning: {seq_len} tokens exceed the {r['supported_context']} that rope base "
                   f"{r['rope_theta']:g} supports at head dim {r['head_dim']} (Xu et al., 2024); "
                   f"long-range attention may degrade", err=True)


def eval_cmd(
    model: str = typer.Argument(..., help="built-in name, .gguf file, model directory or hub id"),
    ppl: str = typer.Option("wikitext2", "--ppl",
                            help="evaluation text: wikitext2, a .txt file or hf:NAME:CONFIG:SPLIT"),
    windows: Optional[int] = typer.Option(None, help="number of windows (default: all, the standard protocol)"),
    seq_len: int = typer.Option(2048, help="tokens per window (stride = window)"),
    kl_against: Optional[str] = typer.Option(None, help="reference model for KL divergence and top-1 agreement"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    runtime: str = typer.Option("auto", help="transformers, llama.cpp, or auto (llama.cpp for a .gguf file path)"),
    threads: Optional[int] = typer.Option(None, help="llama.cpp threads (default: all cores)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
    task: Optional[str] = typer.Option(None, help="instead of perplexity: zero-shot accuracy on a task (hellaswag)"),
    limit: Optional[int] = typer.Option(None, help="with --task: the first N tasks (default: all)"),
    stream: bool = typer.Option(False, help="larger than RAM: one decoder layer at a time (model and reference)"),
):
    """Perplexity (standard protocol) and, with --kl-against, KL divergence and top-1 agreement;
    or with --task, zero-shot accuracy (acc, acc_norm and their standard errors). A GGUF file is
    scored from llama.cpp's own logits (the reference runs in transformers)."""
    from . import data, models
    from .measure import perplexity

    if runtime not in ("auto", "transformers", "llama.cpp"):
        raise PocketError(f"unknown --runtime '{runtime}'; use transformers, llama.cpp or auto")
    _check("windows", windows, 1)
    _check("seq-len", seq_len, 2)
    _check("limit", limit, 1)
    if task is not None:
        from . import zeroshot

        if task not in zeroshot.TASKS:
            raise PocketError(f"unknown --task '{task}'; use one of: {', '.join(zeroshot.TASKS)}")
    if json_out:
        check_output(json_out, True, "file", inputs=_local_inputs(model, kl_against))
    _check("threads", threads, 1)
    if task is None:
        data.check_text(ppl)
    if kl_against is not None:
        models.load_config(kl_against)  # a missing or broken reference is found before any weights load
    _check_context(model, seq_len)
    use_cpp = runtime == "llama.cpp" or (runtime == "auto" and model.endswith(".gguf"))
    if stream:
        return _eval_streamed(model, ppl, seq_len, windows, kl_against, dtype, json_out, use_cpp or task is not None)
    if use_cpp:
        from .runtime.llamacpp import LlamaCppScorer

        src = models.resolve(model)
        if src.kind != "gguf":
            raise PocketError("--runtime llama.cpp needs a .gguf file; export one with `pocketlm export`")
        tok = models.load_tokenizer(src)
        if task is not None:
            return _zero_shot(zeroshot.LlamaCppChoices(src.describe(), threads), tok, task, limit, model, json_out)
        m = LlamaCppScorer(src.describe(), n_ctx=seq_len, threads=threads)
    else:
        m, tok, _ = models.load(model, dtype=dtype)
        if task is not None:
            return _zero_shot(zeroshot.TorchChoices(m), tok, task, limit, model, json_out)
    ref = models.load(kl_against, dtype=dtype)[0] if kl_against else None
    _report_eval(model, perplexity(m, tok, ppl, seq_len, windows, reference=ref).to_dict(), json_out)


def _report_eval(model: str, result: dict, json_out: Optional[Path]) -> None:
    print(json.dumps({"model": model, **result}))
    if json_out:
        _write_json(json_out, {"model": model, **result})


def _eval_streamed(model: str, ppl: str, seq_len: int, windows: Optional[int], kl_against: Optional[str], dtype,
                   json_out: Optional[Path], refused: bool) -> None:
    if refused:
        raise PocketError("--stream scores a transformers model's perplexity layer by layer; a GGUF file is "
                          "already memory-mapped by llama.cpp (drop --stream), and --task does not stream")
    from . import models
    from .data import eval_windows
    from .measure import StreamedScorer, evaluate_windows

    dtype = models.parse_dtype(dtype)
    ids = eval_windows(models.load_tokenizer(models.resolve(model)), ppl, seq_len, windows)
    ref = StreamedScorer(kl_against, ids, dtype) if kl_against else None
    r = evaluate_windows(StreamedScorer(model, ids, dtype), ids, reference=ref, corpus=ppl).to_dict()
    _report_eval(model, {"streamed": True, **r}, json_out)


def _check_context(model: str, seq_len: int) -> None:
    """Refuse windows longer than the model's context; warn beyond what its RoPE base supports."""
    from . import models

    try:
        config = models.load_config(model)
    except PocketError:
        if not model.endswith(".gguf"):
            raise
        return  # a GGUF file transformers cannot describe still runs in llama.cpp
    longest = getattr(config, "max_position_embeddings", None)
    if longest and seq_len > longest:
        raise PocketError(f"--seq-len {seq_len} is longer than the model's context ({longest} tokens); "
                          f"use at most {longest}")
    _warn_context(config, seq_len)


def _zero_shot(scorer, tok, task: str, limit, model: str, json_out) -> None:
    from . import zeroshot

    r = zeroshot.evaluate(scorer, tok, zeroshot.load_tasks(task, limit), task)
    d = {"model": model, **{k: v for k, v in r.to_dict().items() if k != "correct_norm"}}
    print(json.dumps(d))
    if json_out:
        _write_json(json_out, {**d, "correct_norm": r.correct_norm})


def _write_json(path: Path, obj: dict) -> None:
    from .fsutil import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
