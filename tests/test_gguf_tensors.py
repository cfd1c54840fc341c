"""GGUF tensor layout helpers: the RoPE row permutation and its inverse; which tensors carry it."""
import pytest
import torch

from pocketlm.gguf_tensors import permuted_heads, rope_permute, rope_unpermute
from tests.conftest import make_tiny, make_tiny_gemma3


@pytest.mark.parametrize("heads, dim", [(4, 16), (9, 64), (3, 64)])
def test_unpermute_inverts_permute_and_moves_rows_within_heads(heads, dim):
    rows = torch.arange(heads * dim, dtype=torch.float32)[:, None].repeat(1, 3)
    p = rope_permute(rows, heads)
    assert not torch.equal(p, rows)
    assert torch.equal(rope_unpermute(p, heads), rows)
    # every row stays inside its own head's block
    head_of = (p[:, 0] // dim).long()
    assert torch.equal(head_of, torch.arange(heads).repeat_interleave(dim))


def test_only_llama_q_and_k_are_permuted():
    llama, gemma = make_tiny(layers=1).config, make_tiny_gemma3(layers=1).config
    assert permuted_heads(llama, "model.layers.0.self_attn.q_proj.weight") == llama.num_attention_heads
    assert permuted_heads(llama, "model.layers.0.self_attn.k_proj.weight") == llama.num_key_value_heads
    assert permuted_heads(llama, "model.layers.0.self_attn.v_proj.weight") is None
    assert permuted_heads(gemma, "model.layers.0.self_attn.q_proj.weight") is None
