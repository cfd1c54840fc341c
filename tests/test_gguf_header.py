"""The bounds-checked GGUF header walk: real files pass, impossible counts are refused at once."""
import time

import pytest
from gguf import GGUFReader

from pocketlm import gguf_header, models
from pocketlm.errors import PocketError
from tests.conftest import make_tiny, make_tiny_tokenizer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from pocketlm.export import export_model

    tok = make_tiny_tokenizer()
    path = tmp_path_factory.mktemp("h") / "small.gguf"
    export_model(make_tiny(layers=1, vocab=len(tok)), tok, {}, "gguf", path, "Q8_0", "Q8_0")
    return path


def test_files_pocketlm_and_llamacpp_write_pass(small):
    gguf_header.check(small)
    gguf_header.check(models.resolve("smollm2-135m").describe())  # written by llama.cpp's converter


def _with(path, tmp_path, field_name, part, value):
    f = GGUFReader(str(path)).fields[field_name]
    offset = f.offset + sum(p.nbytes for p in f.parts[:part])
    b = bytearray(path.read_bytes())
    n = f.parts[part].nbytes
    b[offset:offset + n] = value.to_bytes(n, "little")
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(b))
    return out


def test_an_array_of_two_to_the_63_strings_is_refused_at_once(small, tmp_path):
    """gguf-py's reader would loop over 2^63 items, allocating as it goes."""
    bad = _with(small, tmp_path, "tokenizer.ggml.tokens", 4, 2**63 - 1)  # parts: key len, key, type, item type, count
    t = time.perf_counter()
    with pytest.raises(PocketError, match="an array of 9,223,372,036,854,775,807 items runs past the end"):
        gguf_header.check(bad)
    assert time.perf_counter() - t < 1


def test_a_key_count_the_file_cannot_hold_is_refused(small, tmp_path):
    bad = _with(small, tmp_path, "GGUF.kv_count", 0, 2**40)
    with pytest.raises(PocketError, match="cannot fit in"):
        gguf_header.check(bad)


def test_metadata_that_contradicts_the_tensors_is_refused_before_a_model_is_built(small, tmp_path):
    """A block count of 2^32 - 1 would make transformers build four billion layers."""
    bad = _with(small, tmp_path, "llama.block_count", 3, 2**32 - 1)
    with pytest.raises(PocketError, match="its metadata says 4294967295 layers but it holds 1"):
        models.load_config(str(bad))
    bad = _with(small, tmp_path, "llama.feed_forward_length", 3, 160 * 64)
    with pytest.raises(PocketError, match="its metadata describes .* parameters but it holds"):
        models.load_config(str(bad))
