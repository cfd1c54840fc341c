import pytest
import torch

from pocketlm import PocketError
from pocketlm import data
from pocketlm.data import _bundled_path, calibration_windows, eval_windows, load_text, sha256


def test_bundled_texts_are_the_published_files():
    assert sha256(_bundled_path("wikitext2")) == "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
    assert sha256(_bundled_path("python-docs")) == "8b10d7781bae2c1b161d423a28696bc2c02d4bc131899c12cb95a2eb5eed579c"
    assert load_text("wikitext2").count("\n") + 1 == 2891


def test_eval_windows_are_non_overlapping_prefix(tokenizer):
    w = eval_windows(tokenizer, "wikitext2", seq_len=512, max_windows=3)
    assert w.shape == (3, 512)
    ids = tokenizer(load_text("wikitext2")[:20000], add_special_tokens=False).input_ids
    assert w[0].tolist() == ids[:512] and w[1].tolist() == ids[512:1024]


def test_calibration_windows_are_seeded_and_disjoint_from_eval(tokenizer):
    a = calibration_windows(tokenizer, n=4, seq_len=64, seed=0)
    b = calibration_windows(tokenizer, n=4, seq_len=64, seed=0)
    c = calibration_windows(tokenizer, n=4, seq_len=64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 64)
    with pytest.raises(PocketError, match="evaluation data"):
        calibration_windows(tokenizer, n=2, seq_len=64, text="wikitext2")


class _BosTokenizer:
    """A tokenizer that asks for BOS first (as Gemma's does): one id per character."""

    add_bos_token, bos_token_id = True, 2

    def __call__(self, text, return_tensors=None, add_special_tokens=True, verbose=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[10 + ord(c) % 50 for c in text]]))


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    tok = _BosTokenizer()
    plain = data.tokenize(tok, data.load_text("wikitext2"))
    w = data.eval_windows(tok, "wikitext2", 64, 3)
    assert (w[:, 0] == 2).all() and torch.equal(w[:, 1:], plain[:192].view(3, 64)[:, 1:])
    assert plain[0] != 2 and torch.equal(data.tokenize(tok, data.load_text("wikitext2"))[:64], plain[:64])
    c = data.calibration_windows(tok, 4, 32)
    assert (c[:, 0] == 2).all()
