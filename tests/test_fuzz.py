"""Property-based fuzzing of what an untrusted user hands pocketlm: recipes (as data and as
YAML text), GGUF files with damaged headers, and the command line's numeric options. The one
property: every input is either accepted or refused with a one-line PocketError (exit 2 on the
command line), never a traceback. The examples are derandomized so that CI runs the same ones;
POCKETLM_FUZZ_RANDOM=1 draws new ones on every run (to search further)."""
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from pocketlm import models, recipe
from pocketlm.errors import PocketError
from pocketlm.export import ExportTarget
from pocketlm.methods import load_builtin_methods
from pocketlm.stages import REGISTRY
from tests.conftest import FUZZ_COUNTS, make_tiny, make_tiny_tokenizer, run_cli

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

FUZZ = settings(deadline=None, derandomize=not os.environ.get("POCKETLM_FUZZ_RANDOM"), database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def fuzz(examples: int):
    return settings(FUZZ, max_examples=examples)


def _count(what: str) -> None:
    FUZZ_COUNTS[what] = FUZZ_COUNTS.get(what, 0) + 1


def _refused_in_one_line(fn) -> None:
    try:
        fn()
    except PocketError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))


# ---- recipes -------------------------------------------------------------------------------

load_builtin_methods()
FIELDS = sorted({f for c in REGISTRY.values() for f in c.model_fields} - {"method"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12),
                    st.sampled_from(["gguf-q4_0", "gguf-iq4_nl", "Q4_K", "F16", "../x", "/etc/passwd", "~/x",
                                     "a/../../b", "*", "model.layers.*.mlp.*", "hessian", "attention", "-1", "1e309"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
stages = st.fixed_dictionaries({"method": st.one_of(st.sampled_from(sorted(REGISTRY)), values)},
                               optional={f: values for f in FIELDS})
exports = st.fixed_dictionaries({}, optional={f: values for f in ExportTarget.model_fields})
recipes = st.one_of(
    st.fixed_dictionaries({"stages": st.one_of(st.lists(stages, max_size=3), values)},
                          optional={"name": values, "description": values, "export": st.lists(exports, max_size=2),
                                    "stgaes": values}),
    values)


@fuzz(2000)
@given(recipes)
def test_any_recipe_is_accepted_or_refused_in_one_line(data):
    _count("recipes")
    _refused_in_one_line(lambda: recipe.from_dict(data))


@fuzz(300)
@given(recipes, st.binary(max_size=8), st.integers(0, 400))
def test_any_recipe_text_is_accepted_or_refused_in_one_line(tmp_path_factory, data, noise, at):
    """The same through the YAML file a user passes with --recipe, with bytes spliced in (not
    UTF-8, tabs, stray colons and brackets)."""
    _count("recipe files")
    text = yaml.safe_dump(data, allow_unicode=True).encode()
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(text[:at] + noise + text[at:])
    _refused_in_one_line(lambda: recipe.from_yaml(path))


# ---- GGUF files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A 1-layer model with a 320-token vocabulary as GGUF (72 KB), and the byte ranges of its
    header's structural fields (key lengths, value types, array lengths, counts, tensor dims,
    types and offsets): where a damaged or hostile header does harm."""
    from gguf import GGUFReader

    from pocketlm.export import export_model

    tok = make_tiny_tokenizer()
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    export_model(make_tiny(layers=1, vocab=len(tok)), tok, {}, "gguf", path, "Q8_0", "Q8_0")
    reader = GGUFReader(str(path))
    spots = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        offset = field.offset
        for part in field.parts[:6]:
            spots.append((offset, part.nbytes))
            offset += part.nbytes
    return path.read_bytes(), spots, reader.data_offset


EXTREMES = [0, 1, 7, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


@fuzz(500)
@given(st.sampled_from(["field", "flip", "truncate"]), st.data())
def test_a_damaged_gguf_header_is_refused_in_one_line(small_gguf, tmp_path_factory, kind, draw):
    """Overwrite a structural field with an extreme or random value, flip bytes anywhere in the
    header, or cut the file short; then read it as pocketlm does (config, then weights)."""
    _count("damaged GGUF headers")
    original, spots, header_end = small_gguf
    b = bytearray(original)
    if kind == "field":
        offset, n = draw.draw(st.sampled_from(spots))
        v = draw.draw(st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)))
        b[offset:offset + n] = (v % 2 ** (8 * n)).to_bytes(n, "little")
    elif kind == "flip":
        for i in draw.draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=8)):
            b[i] ^= draw.draw(st.integers(1, 255))
    else:
        b = b[: draw.draw(st.integers(0, len(b) - 1))]
    path = tmp_path_factory.getbasetemp() / "damaged.gguf"
    path.write_bytes(bytes(b))
    _refused_in_one_line(lambda: models.load(str(path)))


# ---- the command line's numeric options ----------------------------------------------------

OPTIONS = [("eval", "--windows"), ("eval", "--seq-len"), ("eval", "--limit"), ("eval", "--threads"),
           ("compress", "--calib-windows"), ("compress", "--calib-len"), ("compress", "--eval-windows"),
           ("compress", "--eval-len"), ("compress", "--bpw"), ("compress", "--bytes"), ("compress", "--seed"),
           ("analyze", "--calib-windows"), ("analyze", "--calib-len"), ("analyze", "--group-size"),
           ("analyze", "--remove-fraction"), ("analyze", "--bits"),
           ("bench", "--threads"), ("bench", "--prompt"), ("bench", "--gen"), ("bench", "--reps"),
           ("chat", "--max-tokens"), ("chat", "--threads")]
numbers = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(repr), st.sampled_from(
    ["nan", "inf", "-inf", "1e309", "0x10", "1_000", "", " ", "5MB", "-1KiB", "2,3", "½", "1e-320"]),
    st.text(max_size=6))


@fuzz(400)
@given(st.sampled_from(OPTIONS), numbers)
def test_any_numeric_option_is_refused_in_one_line(tmp_path_factory, option, value):
    """Any value of any numeric option, on a model that does not exist: exit 2 and one line
    (the option's range, a usage error, or the missing model), never a traceback."""
    _count("command lines")
    command, name = option
    out = ["--out", str(tmp_path_factory.getbasetemp() / "fuzz-out")] if command in ("compress", "analyze") else []
    extra = ["--preset", "aptq"] if command == "compress" else []
    code, err = run_cli([command, "missing.gguf", *extra, *out, f"{name}={value}"])
    lines = [x for x in err.splitlines() if not x.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
