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


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(scope="session")
def smol():
    from pocketlm import models

    model, tok, src = models.load("smollm2-135m")
    return model, tok, src


@pytest.fixture(scope="session")
def tokenizer(smol):
    return smol[1]
