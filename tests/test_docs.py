"""The code in the docs runs as the docs say."""
import re
import runpy
import sys
import types
from pathlib import Path

import torch

from pocketlm import compress, stages
from tests.conftest import make_tiny

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_adding_a_method_example_registers_and_compresses():
    code = _python_blocks("adding-a-method.md")[0]
    module = types.ModuleType("pocketlm_doc_ternary")
    sys.modules[module.__name__] = module  # pydantic resolves the annotations through it
    try:
        exec(compile(code, "docs/adding-a-method.md", "exec"), module.__dict__)
        assert stages.REGISTRY["ternary"] is module.Ternary
        m = make_tiny(layers=2)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        res = compress(m, {"stages": [{"method": "ternary", "ratio": 0.7, "ignore": ["*.self_attn.*"]}]})
        summary = res.stages[0]
        assert summary["linears"] == 2 * 3 and 0.3 < summary["zero_fraction"] < 0.7
        for name, p in m.named_parameters():
            if ".mlp." in name:
                for row in p.detach():
                    vals = row.unique()
                    assert len(vals) <= 3 and (vals == 0).any() and torch.allclose(vals.abs().max(), -vals.min())
            else:
                assert torch.equal(p, before[name]), name
    finally:
        stages.REGISTRY.pop("ternary", None)
        sys.modules.pop(module.__name__, None)


def test_every_table_in_the_docs_is_generated_from_the_bench_results():
    """README and docs/ quote benchmark numbers only through ``<!-- table: ARGS -->`` blocks whose
    body is exactly ``bench/table.py ARGS`` on bench/results/ (nothing hand-copied)."""
    table = runpy.run_path(str(DOCS.parent / "bench" / "table.py"))
    assert table["update_docs"](check=True) == []
    blocks = [m for doc in [DOCS.parent / "README.md", *DOCS.glob("*.md")]
              for m in table["BLOCK"].finditer(doc.read_text())]
    assert len(blocks) >= 15 and all(m.group("body").startswith("| ") for m in blocks)


def test_zeroshot_recover_table_pairs_each_healed_model_with_its_compressed_one(capsys):
    """Task by task: the healed model against the same model before recovery and against the
    float model; a compressed model without its healed twin is left out."""
    table = runpy.run_path(str(DOCS.parent / "bench" / "table.py"))
    row = lambda name, hits: {"config": name, "tasks": 4, "acc": 0.5, "acc_stderr": 0.1,  # noqa: E731
                              "acc_norm": sum(hits) / 4, "acc_norm_stderr": 0.1, "correct_norm": hits}
    table["zeroshot_recover"]([row("float-torch", [1, 1, 1, 0]), row("dir:a", [0, 0, 1, 0]),
                               row("dir:a+recover", [1, 0, 1, 1]), row("dir:lonely", [0, 0, 0, 0])])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| a", "| a+recover"]
    assert lines[1].split(" | ")[-1].startswith("+0.5000 +- ")  # 2 of 4 tasks gained after recovery
    assert lines[0].split(" | ")[4].startswith("-0.5000 +- ")  # 2 of 4 lost against the float model
