"""HellaSwag zero-shot scoring (lm-eval's protocol) in PyTorch and llama.cpp."""
import pytest
import torch

from pocketlm import zeroshot
from pocketlm.export import gguf as G
from tests.conftest import make_tiny, make_tiny_gemma3

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)


def test_bundled_hellaswag_parses_as_published():
    tasks = zeroshot.load_tasks("hellaswag")
    assert len(tasks) == 10042
    t = tasks[0]
    assert t.context == "Roof shingle removal: A man is sitting on a roof. he" and t.label == 3
    assert t.endings[3] == "starts pulling up roofing on a roof."
    assert len(zeroshot.load_tasks(limit=7)) == 7


class _Fixed:
    """A scorer returning given log-likelihoods per task, in order."""

    def __init__(self, values):
        self.values = iter(values)

    def loglik(self, ctx, conts):
        return next(self.values)


def test_acc_takes_the_sum_and_acc_norm_the_sum_per_byte(tokenizer):
    t = zeroshot.Task("ctx", 1, ["a", "bbbbbbbbbb", "c", "d"])  # " a": 2 bytes, the gold " bbbbbbbbbb": 11
    r = zeroshot.evaluate(_Fixed([[-6.0, -5.0, -9.0, -9.0]]), tokenizer, [t])
    assert (r.acc, r.acc_norm) == (1.0, 1.0)
    # the short ending has the higher sum (-1 > -5) but the lower per byte (-0.5 < -0.45)
    r = zeroshot.evaluate(_Fixed([[-1.0, -5.0, -9.0, -9.0]]), tokenizer, [t])
    assert (r.acc, r.acc_norm) == (0.0, 1.0)
    r = zeroshot.evaluate(_Fixed([[-2.0, -30.0, -9.0, -9.0], [-9.0, -1.0, -9.0, -9.0]]), tokenizer, [t, t])
    assert (r.acc, r.acc_norm, r.tasks) == (0.5, 0.5, 2)
    assert r.acc_stderr == pytest.approx(0.5)  # sample sd (0.707) over sqrt(2)


def _full_sequence_loglik(model, ctx, c):
    """The reference: the whole sequence in one forward pass, no cache."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + c])).logits[0].float(), -1)
    return float(lp[torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1), torch.tensor(c)].sum())


@pytest.mark.parametrize("make", [lambda: make_tiny(layers=2), lambda: make_tiny_gemma3(layers=3)],
                         ids=["llama", "gemma3-sliding"])
def test_the_cached_context_gives_the_full_sequence_loglik(tokenizer, make):
    """Context once, continuations from its cache, equals each sequence scored whole (Gemma 3's
    sliding-window layers, window 16, shorter than the contexts, included)."""
    m = make()
    torch_s = zeroshot.TorchChoices(m)
    long = [enc for enc in map(lambda t: zeroshot.encode(tokenizer, t), zeroshot.load_tasks(limit=12))
            if len(enc[0]) > 16]
    assert len(long) >= 3
    for ctx, conts in long[:3]:
        want = [_full_sequence_loglik(m, ctx, c) for c in conts]
        assert torch_s.loglik(ctx, conts) == pytest.approx(want, abs=1e-3)


def test_torch_batch_equals_each_sequence_alone_and_llama_cpp_agrees(tmp_path, tokenizer):
    m = make_tiny(layers=2)
    tasks = zeroshot.load_tasks(limit=3)
    torch_s = zeroshot.TorchChoices(m)
    G.write(m, tokenizer, tmp_path / "f32.gguf", linear_type="F32", embed_type="F32")
    cpp = zeroshot.LlamaCppChoices(tmp_path / "f32.gguf", threads=2)
    for t in tasks:
        ctx, conts = zeroshot.encode(tokenizer, t)
        batch = torch_s.loglik(ctx, conts)
        alone = [torch_s.loglik(ctx, [c])[0] for c in conts]
        assert batch == pytest.approx(alone, abs=1e-3)
        assert cpp.loglik(ctx, conts) == pytest.approx(batch, abs=2e-2)
    a = zeroshot.evaluate(torch_s, tokenizer, tasks)
    b = zeroshot.evaluate(cpp, tokenizer, tasks)
    assert a.correct_norm == b.correct_norm
