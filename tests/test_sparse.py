"""Sparse storage of pruned models (sparse.py)."""

import pytest
import torch

from pocketlm import compress, models
from pocketlm.errors import PocketError
from tests.conftest import make_tiny, random_windows


def test_sparse_checkpoint_is_smaller_and_reloads_to_identical_logits(tmp_path, tokenizer):
    m = make_tiny(layers=2)
    res = compress(m, "wanda-50", tokenizer=tokenizer, calibration=random_windows())
    res.save(tmp_path / "sparse")
    dense = make_tiny(layers=2)
    models.save(dense, None, tmp_path / "dense")
    files = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    lin_bytes = sum(x.weight.numel() * 4 for x in models.layer_linears(m).values())
    saved = files(tmp_path / "dense") - files(tmp_path / "sparse")
    assert saved > 0.45 * lin_bytes  # half the values gone, 1 bit per weight of mask added
    import os

    mask = os.umask(0)
    os.umask(mask)
    for f in ("sparse.safetensors", "model.safetensors", "pocketlm.json"):  # not the temp folder's 0600
        assert (tmp_path / "sparse" / f).stat().st_mode & 0o777 == 0o666 & ~mask
    back, _, _ = models.load(str(tmp_path / "sparse"))
    ids = random_windows(1, 32)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    (tmp_path / "sparse" / "sparse.safetensors").write_bytes(b"garbage")
    with pytest.raises(PocketError, match="damaged"):
        models.load(str(tmp_path / "sparse"))
