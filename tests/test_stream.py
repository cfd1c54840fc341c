"""Streaming (models larger than RAM): the output of a streamed run equals the in-memory run's bit
for bit, only one decoder layer is ever loaded, a stopped run resumes to the same bytes, and
what cannot stream is refused before any work."""
import json

import pytest
import torch

import pocketlm
from pocketlm import models, stream as S
from pocketlm.errors import PocketError

from tests.conftest import make_tiny, make_tiny_tokenizer, run_cli

GPTQ = {"name": "g", "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}
TWO = {"name": "two", "stages": [
    {"method": "gptq", "bits": 4, "group_size": 32, "targets": ["*.self_attn.*"]},
    {"method": "imatrix", "format": "gguf-q4_0", "targets": ["*.mlp.*"]}]}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 4-layer tiny model saved in many small safetensors shards, with its tokenizer."""
    d = tmp_path_factory.mktemp("sharded") / "model"
    tok = make_tiny_tokenizer()
    make_tiny(layers=4, vocab=len(tok), tied=False).save_pretrained(d, max_shard_size="100KB")
    tok.save_pretrained(d)
    return d


def test_journal_entries_are_spaced_in_time_but_every_stage_ends_with_one(sharded, windows, tmp_path, monkeypatch):
    entries = []
    real = S.Streamer._journal
    monkeypatch.setattr(S.Streamer, "_journal",
                        lambda self, n, *a: entries.append((self.stage, n)) or real(self, n, *a))
    pocketlm.compress(str(sharded), TWO, calibration=windows, stream=tmp_path / "work")
    assert entries == [(0, 4), (1, 0), (1, 4), (2, 0)]  # the default spacing (a minute) outlasts this run


def test_the_journal_writes_each_record_once(sharded, windows, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setattr(S.Streamer, "CHECKPOINT_SECONDS", 0.0)  # a journal entry after every layer
    monkeypatch.setattr(S.Streamer, "close", lambda self: None)  # keep the work files to look at
    res = pocketlm.compress(str(sharded), TWO, calibration=windows, stream=tmp_path / "work")
    res.save(tmp_path / "out")
    files = json.loads((tmp_path / "work" / S.JOURNAL).read_text())["record_files"]
    keys = []
    for f in files:
        with safe_open(str(tmp_path / "work" / f), "pt") as h:
            keys += list(h.keys())
    assert len(files) == 8 and len(keys) == len(set(keys))  # one file per layer of each stage
    assert sorted(keys) == sorted(k for n, r in res.context.quant.items() for k in r.saved_tensors(n))


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))


def _weights(path):
    return models.load(str(path))[0].state_dict()


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def in_memory(sharded, windows, tmp_path_factory):
    out = {}
    for rec in (GPTQ, TWO):
        path = tmp_path_factory.mktemp("mem") / rec["name"]
        pocketlm.compress(str(sharded), rec, calibration=windows).save(path)
        out[rec["name"]] = path
    return out


@pytest.mark.parametrize("recipe", [GPTQ, TWO], ids=["gptq", "gptq+imatrix"])
def test_streamed_output_equals_in_memory_bit_for_bit(sharded, windows, in_memory, recipe, tmp_path):
    res = pocketlm.compress(str(sharded), recipe, calibration=windows, stream=tmp_path / "work")
    res.save(tmp_path / "out")
    assert _same(_weights(tmp_path / "out"), _weights(in_memory[recipe["name"]]))
    mine = json.loads((tmp_path / "out" / "pocketlm.json").read_text())
    theirs = json.loads((in_memory[recipe["name"]] / "pocketlm.json").read_text())
    assert mine["linears"] == theirs["linears"] and mine["size"] == theirs["size"]
    assert not (tmp_path / "work").exists()  # the work files go once the output is written


def test_a_tied_model_streams_with_its_head_tied(tiny_dir, windows, tmp_path):
    """A tied model's files hold no head: the streamed skeleton ties it, as loading does."""
    mem = pocketlm.compress(str(tiny_dir), GPTQ, calibration=windows)
    mem.save(tmp_path / "mem")
    pocketlm.compress(str(tiny_dir), GPTQ, calibration=windows, stream=tmp_path / "work").save(tmp_path / "out")
    out = models.load(str(tmp_path / "out"))[0]
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()
    assert _same(out.state_dict(), _weights(tmp_path / "mem"))


def test_only_one_decoder_layer_is_ever_loaded(sharded, windows, tmp_path, monkeypatch):
    seen = []
    load = S.Streamer.load

    def spy(self, idx):
        layer = load(self, idx)
        seen.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in self.layers))
        return layer

    monkeypatch.setattr(S.Streamer, "load", spy)
    pocketlm.compress(str(sharded), TWO, calibration=windows, stream=tmp_path / "work")
    assert seen == [1] * 8  # 4 layers x 2 stages, each alone in memory when its turn comes


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [2, 4, 6], ids=["stage0-layer1", "stage0-last", "stage1-layer1"])
def test_a_stopped_run_resumes_to_the_same_bytes(sharded, windows, in_memory, tmp_path, monkeypatch, stop_at):
    """Stopped after ``stop_at`` journal entries (each layer writes one here, each finished stage
    one), the run started again with the same work directory ends with the uninterrupted output."""
    monkeypatch.setattr(S.Streamer, "CHECKPOINT_SECONDS", 0.0)
    real = S.Streamer._journal
    count = {"n": 0}

    def dying(self, *a, **k):
        real(self, *a, **k)
        count["n"] += 1
        if count["n"] == stop_at:
            raise _Stop

    monkeypatch.setattr(S.Streamer, "_journal", dying)
    with pytest.raises(_Stop):
        pocketlm.compress(str(sharded), TWO, calibration=windows, stream=tmp_path / "work")
    monkeypatch.setattr(S.Streamer, "_journal", real)
    done = json.loads((tmp_path / "work" / S.JOURNAL).read_text())
    assert (done["stage"], done["layers_done"]) == {2: (0, 2), 4: (0, 4), 6: (1, 1)}[stop_at]

    loaded = []
    load = S.Streamer.load
    monkeypatch.setattr(S.Streamer, "load", lambda self, idx: loaded.append((self.stage, idx)) or load(self, idx))
    res = pocketlm.compress(str(sharded), TWO, calibration=windows, stream=tmp_path / "work")
    res.save(tmp_path / "out")
    assert loaded[0] == {2: (0, 2), 4: (1, 0), 6: (1, 1)}[stop_at]  # work already done is not redone
    assert _same(_weights(tmp_path / "out"), _weights(in_memory["two"]))
    mine = json.loads((tmp_path / "out" / "pocketlm.json").read_text())
    assert [s["method"] for s in mine["stages"]] == ["gptq", "imatrix"]
    assert mine["linears"] == json.loads((in_memory["two"] / "pocketlm.json").read_text())["linears"]


@pytest.mark.parametrize("recipe, says", [
    ({"name": "w", "stages": [{"method": "wanda", "sparsity": 0.5}]}, "stage 'wanda' cannot run on a streamed"),
    ({"name": "i", "stages": [{"method": "imatrix", "sequential": False}]}, "use sequential: true"),
    ({"name": "e", "stages": [{"method": "gptq"}], "export": [{"format": "compressed-tensors"}]},
     "a streamed run exports GGUF only"),
])
def test_what_cannot_stream_is_refused_before_any_work(sharded, windows, tmp_path, recipe, says):
    with pytest.raises(PocketError, match=says):
        pocketlm.compress(str(sharded), recipe, calibration=windows, stream=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_streamed_run_writes_the_gguf_file_an_in_memory_run_writes(sharded, windows, tmp_path):
    rec = {**TWO, "export": [{"format": "gguf", "type": "Q8_0", "embed_type": "Q8_0"}]}
    pocketlm.compress(str(sharded), rec, calibration=windows).save(tmp_path / "mem")
    pocketlm.compress(str(sharded), rec, calibration=windows, stream=tmp_path / "work").save(tmp_path / "out")
    mem, out = (tmp_path / d / "model.gguf" for d in ("mem", "out"))
    assert out.read_bytes() == mem.read_bytes()
    assert json.loads((tmp_path / "out" / "pocketlm.json").read_text())["exports"]["model.gguf"]["bytes"] == \
        mem.stat().st_size


def test_a_streamed_export_never_loads_the_model_and_writes_the_same_bytes(in_memory, tmp_path, monkeypatch):
    from pocketlm.export import run_export

    run_export(str(in_memory["two"]), "gguf", tmp_path / "mem.gguf", qtype="Q8_0")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the streamed export loaded the model"))
    got = []
    real = S.SafetensorsSource.get
    monkeypatch.setattr(S.SafetensorsSource, "get", lambda self, name: got.append(name) or real(self, name))
    run_export(str(in_memory["two"]), "gguf", tmp_path / "out.gguf", qtype="Q8_0", stream=True)
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()
    assert len(got) == len(set(got)) > 4 * 9  # every tensor read once, one at a time
    with pytest.raises(PocketError, match="exports GGUF only"):
        run_export(str(in_memory["two"]), "compressed-tensors", tmp_path / "ct", stream=True)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gguf_file(request, tmp_path_factory):
    """A tiny model written as a Q8_0 GGUF file (llama: q/k rows permuted; Gemma 3: norms + 1)."""
    from pocketlm.export import gguf as G
    from tests.conftest import make_tiny_gemma3

    tok = make_tiny_tokenizer()
    m = make_tiny(layers=3, vocab=len(tok)) if request.param == "llama" else make_tiny_gemma3(vocab=len(tok))
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    G.write(m, tok, path, None, None, "Q8_0", "Q8_0")
    return path


@pytest.mark.parametrize("rows", [4096, 3], ids=["whole", "blocks-of-3-rows"])
def test_gguf_source_reads_each_tensor_as_the_gguf_loader_does(gguf_file, rows, monkeypatch):
    from pocketlm.gguf_tensors import GGUFSource

    monkeypatch.setattr(GGUFSource, "ROWS", rows)
    model = models.load(str(gguf_file))[0]
    src = GGUFSource(str(gguf_file), model.config)
    state = model.state_dict()
    for name, want in state.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            assert name not in src
            continue
        assert torch.equal(src.get(name), want), name


def _mapped_rss(path) -> int:
    """Bytes of ``path``'s memory mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("drop", [True, False], ids=["dropped", "kept"])
def test_gguf_source_leaves_no_tensor_pages_resident(gguf_file, drop, monkeypatch):
    from pocketlm.gguf_tensors import GGUFSource

    model = models.load(str(gguf_file))[0]
    src = GGUFSource(str(gguf_file), model.config)
    if not drop:  # the check can fail: without the unmapping, every page read stays resident
        monkeypatch.setattr(src, "_drop_pages", lambda: None)
    at_open = _mapped_rss(gguf_file)
    for name in model.state_dict():
        if name in src:
            src.get(name)
    grown = _mapped_rss(gguf_file) - at_open
    assert (grown <= 2 * 4096) if drop else (grown > gguf_file.stat().st_size // 2), grown


def test_a_gguf_model_streams_to_the_in_memory_result(gguf_file, tmp_path):
    w = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    mem = pocketlm.compress(str(gguf_file), GPTQ, calibration=w)
    mem.save(tmp_path / "mem")
    pocketlm.compress(str(gguf_file), GPTQ, calibration=w, stream=tmp_path / "work").save(tmp_path / "out")
    assert _same(_weights(tmp_path / "out"), _weights(tmp_path / "mem"))


def test_source_without_safetensors_is_refused(tmp_path):
    with pytest.raises(PocketError, match="holds no safetensors weights"):
        S.SafetensorsSource(tmp_path)


def test_cli_stream_and_resume(sharded, in_memory, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(sharded), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--calib-windows", "2",
            "--calib-len", "32", "--calib-text", str(tmp_path / "c.txt"), "--eval-windows", "0"]
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    (tmp_path / "r.yaml").write_text("name: g\nstages:\n  - method: gptq\n    bits: 4\n    group_size: 32\n")
    code, text = run_cli([*args, "--resume"])
    assert code == 2 and "nothing to resume" in text, text
    (tmp_path / "out.stream-work").mkdir()
    code, text = run_cli([*args, "--stream"])
    assert code == 2 and "add --resume to continue it" in text
    (tmp_path / "out.stream-work").rmdir()
    code, text = run_cli([*args, "--stream"])
    assert code == 0, text
    assert (out / S.INDEX).is_file() and not (tmp_path / "out.stream-work").exists()
    assert models.load(str(out))[0].config.num_hidden_layers == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_streamed_on_cuda_equals_the_in_memory_cuda_run(sharded, windows, tmp_path):
    res = pocketlm.compress(str(sharded), GPTQ, calibration=windows, device="cuda", stream=tmp_path / "work")
    res.save(tmp_path / "out")
    mem = pocketlm.compress(models.load(str(sharded), device="cuda")[0], GPTQ,
                            tokenizer=models.load_tokenizer(models.resolve(str(sharded))), calibration=windows,
                            device="cuda")
    mem.save(tmp_path / "mem")
    a, b = _weights(tmp_path / "out"), _weights(tmp_path / "mem")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_streamed_evaluation_scores_like_the_loaded_model(sharded, in_memory):
    from pocketlm.measure import StreamedScorer, evaluate_windows

    ids = torch.randint(0, 200, (3, 40), generator=torch.Generator().manual_seed(1))
    base, quant = models.load(str(sharded))[0], models.load(str(in_memory["g"]))[0]
    want = evaluate_windows(quant, ids, reference=base)
    got = evaluate_windows(StreamedScorer(str(in_memory["g"]), ids), ids, reference=StreamedScorer(str(sharded), ids))
    assert got.window_nll == pytest.approx(want.window_nll, rel=1e-5)
    assert got.kl == pytest.approx(want.kl, rel=1e-4) and got.kl > 0
    assert got.ref_ppl == pytest.approx(want.ref_ppl, rel=1e-5)


def test_cli_eval_stream(sharded, tmp_path):
    (tmp_path / "e.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    code, text = run_cli(["eval", str(sharded), "--stream", "--ppl", str(tmp_path / "e.txt"), "--seq-len", "64",
                          "--windows", "2", "--json", str(tmp_path / "r.json")])
    assert code == 0, text
    r = json.loads((tmp_path / "r.json").read_text())
    assert run_cli(["eval", str(sharded), "--ppl", str(tmp_path / "e.txt"), "--seq-len", "64", "--windows", "2",
                    "--json", str(tmp_path / "d.json")])[0] == 0
    direct = json.loads((tmp_path / "d.json").read_text())
    assert r["streamed"] and r["ppl"] == pytest.approx(direct["ppl"], rel=1e-5)
    code, text = run_cli(["eval", str(sharded), "--stream", "--task", "hellaswag", "--seq-len", "64"])
    assert code == 2 and "--task does not stream" in text


def test_the_predicted_peak_is_reported_and_streaming_predicts_less(sharded, windows, tmp_path):
    mem = pocketlm.compress(str(sharded), GPTQ, calibration=windows).memory
    streamed = pocketlm.compress(str(sharded), GPTQ, calibration=windows, stream=tmp_path / "work").memory
    for m in (mem, streamed):
        assert m["predicted_peak_bytes"] == sum(v for k, v in m.items() if k not in ("predicted_peak_bytes",
                                                                                      "measured_peak_bytes"))
        assert m["measured_peak_bytes"] > 0
    # the streamed run holds one of the 4 layers: its weights part is the rest plus the largest layer
    assert streamed["weights"] < mem["weights"]
    layer = (mem["weights"] - streamed["weights"]) / 3
    q_o, k_v, mlp, norms = 2 * 64 * 64, 2 * 32 * 64, 3 * 160 * 64, 2 * 64  # hidden 64, 2 KV heads of 16, MLP 160
    assert layer == 4 * (q_o + k_v + mlp + norms)
    wanda = {"name": "w", "stages": [{"method": "wanda", "sparsity": 0.5}]}
    assert pocketlm.compress(str(sharded), wanda, calibration=windows).memory is None  # wanda cannot say


def test_param_bytes_counts_a_tied_embedding_once_tied_or_not(tiny_dir):
    from pocketlm.footprint import param_bytes
    from pocketlm.stream import skeleton

    model = models.load(str(tiny_dir))[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = sum(p.numel() * 4 for p in model.parameters())  # parameters() lists a tied tensor once
    assert param_bytes(model) == want
    assert param_bytes(skeleton(model.config)) == want  # before load_resident ties the head


def test_the_process_part_is_measured_once_the_windows_are_drawn_without_loaded_weights(sharded, windows, tmp_path,
                                                                                        monkeypatch):
    from pocketlm import memory
    from pocketlm.footprint import loaded_bytes, param_bytes

    monkeypatch.setattr(memory, "rss", lambda: 2**30)
    mem = pocketlm.compress(str(sharded), GPTQ, calibration=windows)
    streamed = pocketlm.compress(str(sharded), GPTQ, calibration=windows, stream=tmp_path / "work")
    assert mem.memory["process"] == 2**30 - param_bytes(mem.model)  # the loaded weights are their own part
    assert streamed.memory["process"] == 2**30  # nothing loaded yet: the skeleton is on meta
    skel = S.skeleton(mem.model.config)
    assert loaded_bytes(skel) == 0 and loaded_bytes(mem.model) == param_bytes(mem.model)


def test_cli_streams_by_itself_when_the_model_would_not_fit(sharded, tmp_path, monkeypatch):
    from pocketlm import memory

    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    args = ["compress", str(sharded), "--calib-windows", "2", "--calib-len", "32",
            "--calib-text", str(tmp_path / "c.txt")]
    gptq = tmp_path / "g.yaml"
    gptq.write_text("name: g\nstages:\n  - method: gptq\n    bits: 4\n    group_size: 32\n")
    load = models.load
    monkeypatch.setattr(memory, "available", lambda: 10_000)  # bytes: no model fits
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded whole"))
    code, text = run_cli([*args, "--recipe", gptq, "--out", tmp_path / "out"])
    assert code == 0, text
    man = json.loads((tmp_path / "out" / "pocketlm.json").read_text())
    monkeypatch.setattr(models, "load", load)
    assert man["memory"]["weights"] < sum(p.numel() * 4 for p in load(str(sharded))[0].parameters())
    assert not (tmp_path / "out.stream-work").exists()
    wanda = tmp_path / "w.yaml"  # cannot stream: warned, and run in memory
    wanda.write_text("name: w\nstages:\n  - method: wanda\n    sparsity: 0.5\n")
    code, text = run_cli([*args, "--recipe", wanda, "--out", tmp_path / "w", "--eval-windows", "0"])
    assert code == 0, text
    assert (tmp_path / "w" / "pocketlm.json").is_file() and not (tmp_path / "w.stream-work").exists()
