import os

import pytest
import torch

os.environ.setdefault("POCKETLM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def make_tiny(model_type: str = "llama", layers: int = 2, seed: int = 0, vocab: int = 49152, hidden: int = 64,
              inter: int = 160, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, tied: bool = True, **extra):
    """A small random model of a supported architecture (weights scaled to give peaked
    distributions, so quantization and pruning effects are visible)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
        tie_word_embeddings=tied, **({"rope_theta": 10000.0} | extra),
    )
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif model_type.startswith("gemma"):  # norms scale by (1 + w): make them non-trivial
                p.normal_(0, 0.1)
    return m


def make_tiny_gemma3(layers: int = 3, seed: int = 0, **kw):
    """A small random Gemma 3 text model: sandwich norms, q/k norms, and sliding-window layers
    (window 16) between global ones."""
    types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)]
    return make_tiny("gemma3_text", layers=layers, seed=seed, **({"heads": 4, "kv_heads": 1, "head_dim": 32,
                     "sliding_window": 16, "layer_types": types, "query_pre_attn_scalar": 32,
                     "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}} | kw))


def make_tiny_tokenizer(vocab: int = 320):
    """A byte-level BPE tokenizer of a few hundred tokens, trained here in milliseconds: models
    built with it are small and export to small GGUF files."""
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tm.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog; a model of words, " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved 3-layer tiny model with the small tokenizer (a model directory pocketlm reads)."""
    from pocketlm import models

    tok = make_tiny_tokenizer()
    d = tmp_path_factory.mktemp("tiny") / "model"
    models.save(make_tiny(layers=3, vocab=len(tok)), tok, d)
    return d


def run_cli(args: list[str]) -> tuple[int, str]:
    """pocketlm's main() in this process, as the shell would run it: (exit code, stderr)."""
    import contextlib
    import io
    import signal
    import sys

    from pocketlm import cli

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    err, argv = io.StringIO(), sys.argv
    sys.argv = ["pocketlm", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, err.getvalue()


FUZZ_COUNTS: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        terminalreporter.write_line("fuzzing examples run: " +
                                    ", ".join(f"{n} {what}" for what, n in FUZZ_COUNTS.items()))


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(scope="session")
def smol():
    from pocketlm import models

    model, tok, src = models.load("smollm2-135m")
    return model, tok, src


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, read from its GGUF file (without loading the model)."""
    from pocketlm import models

    return models.load_tokenizer(models.resolve("smollm2-135m"))


def random_windows(n: int = 4, L: int = 64, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    """``n`` windows of ``L`` random token ids (calibration input for the tiny models)."""
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def nm_ok(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of each row keeps at most ``n`` weights."""
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of two worker CPUs, started as a user would (``ray start --head``),
    whose workers import this pocketlm; yields its address, stops it at the end."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import pocketlm

    pytest.importorskip("ray", reason="Ray is not installed: pip install 'pocketlm[ray]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).parent / "ray"
    src = str(Path(pocketlm.__file__).resolve().parents[1])
    repo = str(Path(__file__).resolve().parents[1])  # the tests' own task functions, too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, repo, os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                   check=True, capture_output=True, env=env)
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray as R

        R.shutdown()
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, env=env)
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


def pytest_collection_modifyitems(items):
    """Tests that load the real model (the ``smol`` or ``tokenizer`` fixture) are slow too."""
    for item in items:
        if {"smol", "tokenizer"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
