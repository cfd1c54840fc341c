"""The ``pocketlm`` command line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_analyze import analyze_cmd
from .cli_eval import eval_cmd
from .cli_fit import fit_cmd
from .cli_report import report_cmd
from .cli_common import _bytes, _check, _fmt, _local_inputs, out
from . import outdir
from .errors import PocketError, printable
from .fsutil import check_output
from .models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Compress a Hugging Face causal LM into the best model that fits a device.")
app.command("analyze")(analyze_cmd)
app.command("report")(report_cmd)
app.command("fit")(fit_cmd)
app.command("eval")(eval_cmd)


@app.command()
def info(model: str = typer.Argument(DEFAULT_MODEL, help="built-in name, .gguf file, model directory or hub id"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Architecture, parameters, layers, heads, KV heads, rope base and bytes of a model, the
    context length its rope base supports (Xu et al., 2024: B(m) >= 0 up to that length), and its
    KV cache per token and at 2k/8k/32k tokens (float16, q8_0, q4_0 cache types)."""
    from . import kv, models, rope

    m, _, src = models.load(model)
    d = models.info(m, src)
    r = rope.report(m.config)
    d["rope_supported_context"] = r["supported_context"]
    if "supported_context_sliding" in r:
        d["rope_supported_context_sliding"] = r["supported_context_sliding"]
    d.update(kv.report(m.config))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    t = Table(title=f"{model}", show_header=False)
    for k, v in d.items():
        mib = k.startswith("kv_cache") or ("bytes" in k and "per_token" not in k)
        t.add_row(k, _bytes(v) if mib else f"{v:,} B" if "per_token" in k else _fmt(v))
    out.print(t)


@app.command()
def compress(
    model: str = typer.Argument(..., help="built-in name, .gguf file, model directory or hub id"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe file"),
    preset: Optional[str] = typer.Option(None, "--preset", help="named preset (see `pocketlm presets`)"),
    out_dir: Path = typer.Option(..., "--out", help="output directory (written atomically)"),
    calib_windows: int = typer.Option(128, help="calibration windows"),
    calib_len: int = typer.Option(2048, help="tokens per calibration window"),
    calib_text: str = typer.Option("python-docs", help="calibration text: python-docs, a .txt file or hf:NAME:SPLIT"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    offload: bool = typer.Option(False, help="keep layer activations on disk instead of RAM"),
    eval_windows: int = typer.Option(4, help="WikiText-2 windows to measure base vs compressed (0: skip)"),
    eval_len: int = typer.Option(2048, help="tokens per evaluation window"),
    bpw: Optional[float] = typer.Option(None, help="budget in effective bits per weight (aptq)"),
    nbytes: Optional[str] = typer.Option(None, "--bytes", help="budget in bytes of the whole model's tensors "
                                                               "(aptq, gguf): 95000000, 95MB or 90MiB"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    device: str = typer.Option("cpu", help="where to compress: cpu, cuda or cuda:N"),
    stream: bool = typer.Option(False, help="never hold the whole model: read each decoder layer from the "
                                            "safetensors files when its turn comes, write it when done "
                                            "(models larger than RAM; work files in OUT.stream-work); "
                                            "chosen by itself when an in-memory run would not fit"),
    resume: bool = typer.Option(False, help="with --stream: continue a stopped run from its work files"),
):
    """Compress MODEL with a recipe or preset and write it to --out, with pocketlm.json."""
    from . import data, models
    from .context import CalibrationConfig
    from .measure import perplexity
    from .pipeline import compress as run
    from .recipe import from_yaml, parse_bytes, preset as get_preset, with_budget

    if (recipe is None) == (preset is None):
        raise PocketError("give exactly one of --recipe FILE or --preset NAME")
    rec = from_yaml(recipe) if recipe else get_preset(preset)
    rec = with_budget(rec, bpw, parse_bytes(nbytes) if nbytes is not None else None)
    check_output(out_dir, overwrite, "dir", inputs=_local_inputs(model, recipe))
    _check("calib-windows", calib_windows, 1)
    _check("calib-len", calib_len, 2)
    _check("eval-windows", eval_windows, 0)
    _check("eval-len", eval_len, 2)
    _check("bpw", bpw, 1, 16)
    data.check_text(calib_text)
    device = models.check_device(device)
    t0 = time.perf_counter()
    cal = CalibrationConfig(windows=calib_windows, seq_len=calib_len, text=calib_text, seed=seed, offload=offload)
    streamed = stream or resume or _too_big_for_memory(model, rec, cal)
    # given the spec, compress loads (or streams) the model itself
    res = run(model, rec, calibration=cal, device=device, stream=_stream_work(out_dir, resume) if streamed else None)
    res.source = models.resolve(model).describe()
    if streamed:
        eval_windows = 0  # the compressed model is on disk only; `pocketlm eval OUT` scores it
    tok = res.tokenizer
    if eval_windows > 0:
        base, _, _ = models.load(model, device=device)
        r = perplexity(res.model, tok, "wikitext2", eval_len, eval_windows, reference=base)
        res.eval = r.to_dict()
        del base
    path = res.save(out_dir, overwrite=overwrite)
    man = outdir.manifest(path)
    _summary(model, rec.name, man, time.perf_counter() - t0, path)


def _too_big_for_memory(model: str, rec, cal) -> bool:
    """True (said on the console) when the in-memory run's predicted peak exceeds the memory this
    process can still take and the recipe can stream; a recipe that cannot is warned about."""
    from . import memory, models
    from .footprint import in_memory_need
    from .pipeline import check_streamable
    from .stream import skeleton

    avail = memory.available()
    if avail is None:
        return False
    config = models.load_config(model)
    need = in_memory_need(config, rec.stages, cal.windows, cal.seq_len, cal.offload)
    if need <= avail:
        return False
    said = f"an in-memory run needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB is available"
    try:
        check_streamable(rec, skeleton(config))
    except PocketError as e:
        out.print(f"[yellow]warning:[/yellow] {said}, and it cannot stream ({e}); running in memory")
        return False
    out.print(f"{said}: streaming the model layer by layer (as --stream)")
    return True


def _stream_work(out_dir: Path, resume: bool) -> Path:
    """The work directory of a streamed run into ``out_dir``; a stopped run's is only taken
    back with --resume."""
    from .stream import JOURNAL

    work = out_dir.with_name(out_dir.name + ".stream-work")
    if resume and not (work / JOURNAL).is_file():
        raise PocketError(f"nothing to resume: {work} holds no journal; run without --resume")
    if not resume and work.exists():
        raise PocketError(f"{work} holds a stopped streamed run; add --resume to continue it, or delete it")
    return work


def _summary(model: str, recipe: str, man: dict, total_s: float, path: Path, command: str = "compress") -> None:
    size, ev = man["size"], man.get("eval") or {}
    t = Table(title=f"pocketlm {command} {model} ({recipe})")
    t.add_column("")
    t.add_column("base", justify="right")
    t.add_column("compressed", justify="right")
    if ev:
        t.add_row(f"perplexity (wikitext2, {ev['windows']}x{ev['seq_len']}, {ev['dtype']})",
                  _fmt(ev["ref_ppl"]), _fmt(ev["ppl"]))
        t.add_row("KL divergence vs base (nats/token)", "0", _fmt(ev["kl"], 4))
        t.add_row("top-1 agreement with base", "1", _fmt(ev["top1"], 4))
    if size.get("sparsity") is not None:
        t.add_row("sparsity of the pruned linears", "0", _fmt(size["sparsity"], 4))
    removed = [r for s in man["stages"] for r in (s.get("removed") or [])]
    if removed:
        t.add_row("decoder layers removed", "", f"{len(removed)}: {removed}")
    for s in man["stages"]:
        if s.get("method") == "recover":
            t.add_row(f"recovery: {s['tokens']:,} tokens, distillation loss", _fmt(s["loss_first"], 4),
                      _fmt(s["loss_last"], 4))
            if s.get("plan"):
                t.add_row("recovery peak memory: predicted, measured", _bytes(s["plan"]["predicted_peak_bytes"]),
                          _bytes(s["peak_rss_bytes"]))
    mem = man.get("memory")
    if mem:
        t.add_row("peak memory: predicted, measured", _bytes(mem["predicted_peak_bytes"]),
                  _bytes(mem["measured_peak_bytes"]))
    t.add_row("bits per weight, quantized linears", "16", _fmt(size["bpw_quantized"], 4))
    t.add_row("bits per weight, whole model (others 16-bit)", "16", _fmt(size["bpw_model"], 4))
    t.add_row("packed size (16-bit tensors, packed codes, sparse bitmasks)", "", _bytes(size["packed_bytes"]))
    t.add_row("compression time", "", f"{man['seconds']:.1f} s")
    t.add_row("total time (load, compress, eval, save)", "", f"{total_s:.1f} s")
    out.print(t)
    form = "sparse checkpoint: bitmask + kept values" if size.get("sparsity") is not None else "float checkpoint"
    out.print(f"wrote {path} ({_bytes(man['bytes_on_disk'])} on disk as {form})")


@app.command()
def recover(
    model_dir: str = typer.Argument(..., help="a pocketlm output directory (from `pocketlm compress`)"),
    out_dir: Path = typer.Option(..., "--out", help="output directory (written atomically)"),
    memory: Optional[str] = typer.Option(None, help="memory budget, e.g. 2GiB: plan micro-batch and recomputation"),
    tokens: int = typer.Option(200_000, help="training tokens (calibration text only)"),
    mode: str = typer.Option("full", help="unquantized linears: full (masked) or lora (masked before merging)"),
    optimizer: str = typer.Option("adamw", help="adamw or adashift"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default 2e-4 full, 1e-3 lora)"),
    seq_len: int = typer.Option(512, help="tokens per training window"),
    teacher: Optional[str] = typer.Option(None, help="the uncompressed model (default: the one it was made from)"),
    eval_windows: int = typer.Option(4, help="WikiText-2 windows to measure the result against the teacher (0: skip)"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
):
    """Heal a compressed model by distillation from the uncompressed one, keeping its structure
    (pruned weights, removed layers, merged heads, quantization codes); resumable: an
    interrupted run continues from OUT.recover-state.pt when run again."""
    from .recipe import _one_line
    from .recover.stage import Recover
    from .recovery import recover as run

    check_output(out_dir, overwrite, "dir", inputs=_local_inputs(model_dir, teacher))
    _check("tokens", tokens, 1)
    _check("seq-len", seq_len, 8)
    _check("eval-windows", eval_windows, 0)
    from pydantic import ValidationError

    try:
        stage = Recover(tokens=tokens, memory=memory, mode=mode, optimizer=optimizer, lr=lr, seq_len=seq_len,
                        state_file=str(out_dir) + ".recover-state.pt")
    except ValidationError as e:
        raise PocketError(f"recover: {_one_line(e, Recover)}") from None
    t0 = time.perf_counter()
    res = run(model_dir, stage, teacher=teacher, eval_windows=eval_windows)
    path = res.save(out_dir, overwrite=overwrite)
    man = outdir.manifest(path)
    _summary(model_dir, res.recipe.name, man, time.perf_counter() - t0, path, "recover")


@app.command()
def export(
    model: str = typer.Argument(..., help="a pocketlm output directory, or any model spec"),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) or compressed-tensors (transformers, vLLM)"),
    qtype: str = typer.Option("F16", "--type", help="GGUF type of linears not already on a GGUF grid: F16, F32, "
                                                    "Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (RTN)"),
    embed_type: str = typer.Option("F16", help="GGUF type of the token embedding"),
    out_file: Path = typer.Option(..., "--out", help="the .gguf file (or, for compressed-tensors, the directory) "
                                                     "to write, atomically"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    stream: bool = typer.Option(False, help="GGUF: never hold the model, read and write one tensor at a time "
                                            "(models larger than RAM)"),
):
    """Write MODEL as a GGUF file llama.cpp runs, or as a packed compressed-tensors checkpoint;
    quantized linears keep the codes their quantizer chose."""
    from .export import run_export

    if fmt not in ("gguf", "compressed-tensors"):
        raise PocketError(f"unknown --format '{fmt}'; supported: gguf, compressed-tensors")
    check_output(out_file, overwrite, "file" if fmt == "gguf" else "dir", inputs=_local_inputs(model))
    report = run_export(model, fmt, out_file, qtype=qtype, embed_type=embed_type, overwrite=overwrite, stream=stream)
    out.print(f"wrote {out_file} ({_bytes(report['bytes'])}); " +
              ", ".join(f"{k}: {v}" for k, v in report.items() if k != "bytes"))


@app.command("bench")
def bench_cmd(
    model_file: Path = typer.Argument(..., help="a .gguf file"),
    threads: int = typer.Option(2, help="threads (fixed, as llama-bench -t)"),
    prompt: int = typer.Option(512, help="prompt tokens processed in one batch (pp)"),
    gen: int = typer.Option(128, help="tokens generated one at a time (tg)"),
    reps: int = typer.Option(3, help="repetitions; the best is reported"),
    ctx: Optional[int] = typer.Option(None, help="context to allocate, for the KV cache it costs (default: "
                                                 "prompt + gen)"),
):
    """Prompt-processing and generation speed (tokens/s), file bytes, effective bpw, peak RSS and
    the KV cache llama.cpp allocates for --ctx tokens, of a GGUF file."""
    from . import gguf_header
    from .runtime.llamacpp import bench

    for name, v in (("threads", threads), ("prompt", prompt), ("gen", gen), ("reps", reps), ("ctx", ctx)):
        _check(name, v, 1)
    if not model_file.is_file():
        raise PocketError(f"no such GGUF file: {model_file}")
    gguf_header.check(model_file)
    res = bench(model_file, threads, prompt, gen, reps, ctx)
    res["bpw"] = round(res["bytes"] * 8 / _gguf_params(model_file), 4)
    print(json.dumps(res))


def _gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


@app.command()
def chat(
    model: str = typer.Argument(..., help="a .gguf file, a model directory, or any model spec"),
    max_tokens: int = typer.Option(256, help="longest reply"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    threads: Optional[int] = typer.Option(None, help="llama.cpp threads"),
):
    """Chat with the model's own chat template; one message per line, an empty line or EOF ends."""
    from .runtime import chat as ch

    _check("max-tokens", max_tokens, 1)
    _check("threads", threads, 1)
    ch.run(model, max_tokens, system, threads)


@app.command()
def presets():
    """List the named presets."""
    from .recipe import preset, preset_names

    for name in preset_names():
        out.print(f"[bold]{name}[/bold]: {preset(name).description}")


def _quiet_foreign_bars() -> None:
    """transformers' GGUF loader draws a tqdm bar of its own; pocketlm shows its own progress.
    (TQDM_DISABLE is read when tqdm is imported, which has happened by now.)"""
    from functools import partialmethod

    from tqdm import std

    std.tqdm.__init__ = partialmethod(std.tqdm.__init__, disable=True)


class Interrupted(BaseException):
    """A signal that ends the run: raised from the handler so that every atomic writer on the
    stack removes its partial output on the way out (click would swallow a KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


def main() -> None:
    """Exit codes: 0 done, 2 bad input (one line on stderr), 128 + signal number when interrupted
    (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), with no partial output left behind."""
    import signal

    _quiet_foreign_bars()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if len(sys.argv) == 1:
        app()  # no arguments: the help page
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        print("aborted; no output was written", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # a usage error (unknown option, not a number): one line too
        if not hasattr(e, "format_message"):
            raise
        where = e.ctx.command_path if getattr(e, "ctx", None) else "pocketlm"
        print(f"error: {printable(' '.join(e.format_message().split()))} (see {where} --help)", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except PocketError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}); no output was written", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
