"""Fewer KV heads: the folded rotations keep the function exactly, alignment loses less than
mean pooling, and the merged model is a valid smaller transformers model and GGUF file."""
import pytest
import torch

from pocketlm import compress, models
from pocketlm.attention import align
from pocketlm.data import calibration_windows
from pocketlm.errors import PocketError
from tests.conftest import make_tiny, make_tiny_tokenizer


def _rotated_copies(d=8, n=3, tokens=500, seed=0):
    """Outputs of n heads that are one signal seen through n different rotations (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)
    Ys, Qs = [], []
    for h in range(n):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        Ys.append(base @ Q + 0.01 * torch.randn(tokens, d, generator=g, dtype=torch.float64))
        Qs.append(Q)
    Y = torch.cat(Ys, 1)
    return Y.T @ Y, n, d


def test_procrustes_recovers_heads_that_differ_by_a_rotation():
    C, n, d = _rotated_copies()
    B = align.blocks(C, list(range(n)), d)
    eye = torch.eye(d, dtype=torch.float64).repeat(n, 1, 1)
    Q = align.procrustes_values(B)
    assert torch.allclose(Q.transpose(1, 2) @ Q, eye, atol=1e-9)  # orthogonal
    assert align.merge_error(B, eye) > 0.5 and align.merge_error(B, Q) < 1e-3


def test_key_rotations_are_per_rope_pair_and_never_worse_than_none():
    C, n, d = _rotated_copies()
    B = align.blocks(C, list(range(n)), d)
    R = align.procrustes_keys(B)
    pairs = align.pair_index(d)
    mask = torch.zeros(d, d, dtype=torch.bool)
    for p in pairs:
        mask[p[:, None], p[None, :]] = True
    assert (R[:, ~mask] == 0).all()  # only within (i, i + d/2) planes: commutes with RoPE
    assert torch.allclose(torch.linalg.det(R), torch.ones(n, dtype=torch.float64))
    eye = torch.eye(d, dtype=torch.float64).repeat(n, 1, 1)
    assert align.merge_error(B, R) <= align.merge_error(B, eye)


def test_similarity_grouping_pairs_the_heads_that_agree():
    C, _, d = _rotated_copies(n=2, seed=1)
    C2, _, _ = _rotated_copies(n=2, seed=2)
    big = torch.block_diag(C, C2)  # heads 0,1 share a signal, heads 2,3 another
    perm = [0, 2, 1, 3]
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in perm])
    groups = align.group_heads(align.similarity(big[idx][:, idx], 4, d), 2)
    assert sorted(groups) == [[0, 2], [1, 3]]  # positions of the agreeing heads after the shuffle


@pytest.fixture(scope="module")
def setting():
    tok = make_tiny_tokenizer()
    return tok, calibration_windows(tok, 4, 64)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_aligned_merge_loses_less_than_mean_and_keeps_a_valid_model(setting, tmp_path):
    """Four KV heads -> two: both merges halve the KV cache; the aligned one has lower key and
    value output error and stays closer to the original logits; the result saves, reloads with
    from_pretrained and exports to GGUF with two KV heads."""
    tok, calib = setting
    ids = calib[:1]
    ref = make_tiny(layers=2, heads=8, kv_heads=4, vocab=len(tok))
    want = _logits(ref, ids)
    errs, outs = {}, {}
    for merge in ("mean", "aligned"):
        m = make_tiny(layers=2, heads=8, kv_heads=4, vocab=len(tok))
        res = compress(m, {"stages": [{"method": "kv-heads", "kv_heads": 2, "merge": merge}]}, tokenizer=tok,
                       calibration=calib)
        rep = res.stages[0]
        assert rep["kv_heads"] == [4, 2] and m.config.num_key_value_heads == 2
        assert m.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
        errs[merge] = rep["value_error"][merge] + rep["key_error"][merge]
        outs[merge] = torch.nn.functional.kl_div(_logits(m, ids).log_softmax(-1), want.log_softmax(-1),
                                                 log_target=True, reduction="batchmean").item()
        if merge == "aligned":
            res.save(tmp_path / "m")
    assert errs["aligned"] < errs["mean"] and outs["aligned"] < outs["mean"]
    back, _, _ = models.load(str(tmp_path / "m"))
    assert back.config.num_key_value_heads == 2
    assert torch.allclose(_logits(back, ids), _logits(res.model, ids), atol=1e-4)

    from pocketlm.export import export_model
    from pocketlm.measure import evaluate_windows
    from pocketlm.runtime.llamacpp import LlamaCppScorer

    export_model(res.model, tok, {}, "gguf", tmp_path / "m.gguf", "F32", "F32")
    r = evaluate_windows(LlamaCppScorer(tmp_path / "m.gguf", n_ctx=64, threads=2), calib[:2], reference=res.model,
                         chunk=16)
    assert r.kl < 1e-4 and r.top1 > 0.99  # llama.cpp runs it with two KV heads and the same logits


def _rotation_twins(tok):
    """A model whose KV heads come in pairs that see the same keys and values through a rotation:
    keys through per-RoPE-pair rotations, values through any orthogonal matrix."""
    torch.manual_seed(3)
    m = make_tiny(layers=2, heads=8, kv_heads=4, vocab=len(tok))
    d = 16
    for layer in m.model.layers:
        a = layer.self_attn
        wk, wv = a.k_proj.weight.data.view(4, d, -1), a.v_proj.weight.data.view(4, d, -1)
        for h in (1, 3):
            R = torch.zeros(d, d)
            for i, t in zip(range(d // 2), torch.rand(d // 2) * 6.28):
                c, s_ = torch.cos(t), torch.sin(t)
                R[i, i], R[i, i + d // 2], R[i + d // 2, i], R[i + d // 2, i + d // 2] = c, -s_, s_, c
            Q, _ = torch.linalg.qr(torch.randn(d, d))
            wk[h] = R @ wk[h - 1]
            wv[h] = Q @ wv[h - 1]
    return m


def test_heads_that_differ_by_rotations_merge_without_loss_when_aligned(setting):
    """Aligned merging finds the rotations and folds them exactly into W_Q, W_K, W_V and W_O:
    the merged model computes what the original did; mean pooling does not."""
    tok, calib = setting
    ids = calib[:1]
    want = _logits(_rotation_twins(tok), ids)
    for merge, close in (("aligned", True), ("mean", False)):
        m = _rotation_twins(tok)
        compress(m, {"stages": [{"method": "kv-heads", "kv_heads": 2, "merge": merge, "iters": 50}]}, tokenizer=tok,
                 calibration=calib)
        assert torch.allclose(_logits(m, ids), want, atol=1e-3) == close, merge


def test_impossible_head_counts_are_refused():
    m = make_tiny(heads=4, kv_heads=2)
    with pytest.raises(PocketError, match="the model has 2 KV heads and 4 query heads"):
        compress(m, {"stages": [{"method": "kv-heads", "kv_heads": 3}]},
                 calibration=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(PocketError, match="below one KV head per layer"):
        compress(m, {"stages": [{"method": "kv-heads", "kv_bytes_per_token": 10}]},
                 calibration=torch.zeros(1, 8, dtype=torch.long))
