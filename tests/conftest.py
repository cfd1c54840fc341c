import os

import pytest
import torch

os.environ.setdefault("POCKETLM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def make_tiny(model_type: str = "llama", layers: int = 2, seed: int = 0, vocab: int = 49152, hidden: int = 64,
              inter: int = 160, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, tied: bool = True):
    """A small random model of a supported architecture (weights scaled to give peaked
    distributions, so quantization and pruning effects are visible)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
        tie_word_embeddings=tied, rope_theta=10000.0,
    )
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m


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
