"""A model larger than the memory it is given: GPTQ 4-bit of a ~3 GB float32 Llama (random
weights, written here as sharded safetensors, so nothing is downloaded) compressed with
``--stream`` under a hard memory cap (a cgroup v1 memory limit, no swap on this machine), against
the same compression in memory; then a streamed run killed (SIGKILL) half-way and resumed with
``--resume``. The outputs are compared tensor by tensor (every weight, scale and zero point).

    .venv/bin/python bench/bench_stream.py [--cap-mib 1536] [--layers 14] [--calib-windows 4]
    .venv/bin/python bench/bench_stream.py --smollm2   # SmolLM2-135M, 32 x 2048 windows: streamed vs in memory

Each run is a fresh ``pocketlm compress`` process; its peak RSS comes from the kernel
(``wait4``), the cgroup's own high-water mark (page cache of the files read included) beside it.
Results: bench/results/stream.jsonl (``python bench/table.py stream``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, _replace_line, emit  # noqa: E402

DIR = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-gguf")) / "stream"
CGROUP = Path("/sys/fs/cgroup/memory/pocketlm-bench")
RECIPE = "name: gptq-w4-g128\nstages:\n  - method: gptq\n    bits: 4\n    group_size: 128\n"


def make_model(folder: Path, layers: int) -> int:
    """A Llama of ``layers`` layers (hidden 2048, MLP 5632, 16 heads, 4 KV heads, SmolLM2's
    tokenizer and vocabulary, tied embedding) with random weights, written one decoder layer
    per shard without ever holding the model; returns its bytes of weights."""
    import torch
    from transformers import LlamaConfig

    from pocketlm import models
    from pocketlm.stream import INDEX, skeleton

    if (folder / INDEX).is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = models.load_tokenizer(models.resolve("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    meta = skeleton(cfg)
    gen = torch.Generator().manual_seed(0)
    shards: dict[str, dict] = {}
    for name, p in meta.named_parameters():
        if name == "lm_head.weight":
            continue  # tied to the embedding: not stored, as transformers saves a tied model
        part = name.split(".")[2] if name.startswith("model.layers.") else name.removesuffix(".weight")
        t = torch.empty(p.shape).normal_(0, 0.02, generator=gen) if p.dim() == 2 else torch.ones(p.shape)
        shards.setdefault(part, {})[name] = t
        if len(shards) > 1:  # a layer is complete once the next one starts: write it, free it
            done = next(iter(shards))
            _write(tmp, done, shards.pop(done))
    for part, tensors in shards.items():
        _write(tmp, part, tensors)
    weight_map = {}
    for f in sorted(tmp.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            weight_map.update({k: f.name for k in h.keys()})
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _write(folder: Path, part: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"part-{part}.safetensors"))


def run(model: "Path | str", out: Path, calib: int, cap_mib: int | None, extra: list[str],
        kill_after_layers: int | None = None, calib_len: int = 512) -> dict:
    """One ``pocketlm compress`` process (in the capped cgroup when ``cap_mib``); with
    ``kill_after_layers`` it is killed once its journal says that many layers are written."""
    cli = Path(sys.executable).with_name("pocketlm")
    args = [str(cli), "compress", str(model), "--recipe", str(DIR / "recipe.yaml"), "--out", str(out),
            "--calib-windows", str(calib), "--calib-len", str(calib_len), "--eval-windows", "0", *extra]
    if cap_mib:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(cap_mib * 2**20))
        (CGROUP / "memory.max_usage_in_bytes").write_text("0")  # reset the high-water mark

    def enter():
        if cap_mib:
            (CGROUP / "cgroup.procs").write_text(str(os.getpid()))

    t = time.perf_counter()
    env = {**os.environ, "POCKETLM_QUIET": "1"}
    if kill_after_layers is not None:  # a journal after every layer, so the kill lands mid-run
        env["POCKETLM_CHECKPOINT_SECONDS"] = "0"
    p = subprocess.Popen(args, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    journal = out.with_name(out.name + ".stream-work") / "journal.json"
    killed = False
    while kill_after_layers is not None and p.poll() is None:
        try:
            if json.loads(journal.read_text())["layers_done"] >= kill_after_layers:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not killed:
        raise RuntimeError(f"{' '.join(args)} failed ({code}): {err.strip().splitlines()[-1:]}")
    row = {"seconds": round(time.perf_counter() - t, 1), "run_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
           "exit": code}
    if (out / "pocketlm.json").is_file():  # the run's own prediction of its peak, and its parts
        mem = json.loads((out / "pocketlm.json").read_text()).get("memory") or {}
        row["predicted_peak_mib"] = round(mem.get("predicted_peak_bytes", 0) / 2**20, 1)
        row["predicted_parts_mib"] = {k: round(v / 2**20, 1) for k, v in mem.items() if not k.endswith("peak_bytes")}
    if cap_mib:
        row["cap_mib"] = cap_mib
        row["cgroup_peak_mib"] = round(int((CGROUP / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
    return row


def same_output(a: Path, b: Path) -> tuple[bool, int]:
    """Every tensor of the two output directories (weights, scales, zero points) equal, read one
    tensor at a time; returns (equal, tensors compared)."""
    import torch
    from safetensors import safe_open

    from pocketlm.stream import SafetensorsSource

    def tensors(d: Path) -> dict[str, Path]:
        where = dict(SafetensorsSource(d).where)  # one file or shards with their index
        with safe_open(str(d / "quantization.safetensors"), "pt") as h:
            where.update({f"quant:{k}": d / "quantization.safetensors" for k in h.keys()})
        return where

    ta, tb = tensors(a), tensors(b)
    for where in (ta, tb):  # a tied head saved beside its embedding is the same tensor twice
        head = where.get("lm_head.weight")
        if head is not None and set(ta) ^ set(tb) == {"lm_head.weight"}:
            with safe_open(str(head), "pt") as h, safe_open(str(where["model.embed_tokens.weight"]), "pt") as e:
                if torch.equal(h.get_tensor("lm_head.weight"), e.get_tensor("model.embed_tokens.weight")):
                    del where["lm_head.weight"]
    if set(ta) != set(tb):
        return False, 0
    for name in ta:
        key = name.removeprefix("quant:")
        with safe_open(str(ta[name]), "pt") as ha, safe_open(str(tb[name]), "pt") as hb:
            if not torch.equal(ha.get_tensor(key), hb.get_tensor(key)):
                return False, len(ta)
    return True, len(ta)


def smollm2() -> None:
    """The default model (a GGUF file: streamed from its memory-mapped tensors), GPTQ w4 g128 on
    32 x 2048 calibration windows, in memory and streamed, one after the other in this run."""
    outs = {k: DIR / f"smollm2-{k}" for k in ("in-memory", "streamed")}
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    rows = {"in-memory": run("smollm2-135m", outs["in-memory"], 32, None, [], calib_len=2048),
            "streamed": run("smollm2-135m", outs["streamed"], 32, None, ["--stream"], calib_len=2048)}
    rows["streamed"]["equal_to_in_memory"], rows["streamed"]["tensors_compared"] = \
        same_output(outs["streamed"], outs["in-memory"])
    rows["streamed"]["time_ratio"] = round(rows["streamed"]["seconds"] / rows["in-memory"]["seconds"], 3)
    for name, row in rows.items():
        line = emit({"bench": "stream", "config": f"smollm2-{name}", "model": "smollm2-135m", "calib_windows": 32,
                     "calib_len": 2048, "recipe": "gptq w4 g128", **row})
        _replace_line(RESULTS / "stream.jsonl", f"smollm2-{name}", line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-mib", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--smollm2", action="store_true")
    a = ap.parse_args()
    DIR.mkdir(parents=True, exist_ok=True)
    (DIR / "recipe.yaml").write_text(RECIPE)
    if a.smollm2:
        return smollm2()
    model = DIR / f"llama-{a.layers}L"
    nbytes = make_model(model, a.layers)
    outs = {k: DIR / f"out-{k}" for k in ("in-memory", "streamed", "resumed")}
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d.with_name(d.name + ".stream-work"), ignore_errors=True)
    base = {"bench": "stream", "model_bytes": nbytes, "layers": a.layers, "calib_windows": a.calib_windows,
            "calib_len": 512, "recipe": "gptq w4 g128"}
    rows = {"in-memory": run(model, outs["in-memory"], a.calib_windows, None, [])}
    rows["streamed"] = run(model, outs["streamed"], a.calib_windows, a.cap_mib, ["--stream"])
    first = run(model, outs["resumed"], a.calib_windows, a.cap_mib, ["--stream"], kill_after_layers=a.layers // 2)
    rows["resumed"] = run(model, outs["resumed"], a.calib_windows, a.cap_mib, ["--resume"])
    rows["resumed"].update(killed_after_s=first["seconds"], killed_exit=first["exit"],
                           seconds=round(first["seconds"] + rows["resumed"]["seconds"], 1))
    for name, row in rows.items():
        if name != "in-memory":
            row["equal_to_in_memory"], row["tensors_compared"] = same_output(outs[name], outs["in-memory"])
        line = emit({**base, "config": f"{name}-{a.layers}L", **row})
        _replace_line(RESULTS / "stream.jsonl", f"{name}-{a.layers}L", line)
    if CGROUP.exists():
        CGROUP.rmdir()


if __name__ == "__main__":
    main()
