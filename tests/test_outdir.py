"""The output directory's layout (outdir.py): the manifest read back, damage refused in one line."""
import pytest

from pocketlm import outdir
from pocketlm.errors import PocketError


def test_the_manifest_round_trips_and_a_damaged_one_is_refused(tmp_path):
    assert outdir.manifest(tmp_path) is None  # not an output directory
    outdir.write_manifest(tmp_path, {"recipe": "x", "linears": {"a": {"bits": 4}}})
    assert outdir.manifest(tmp_path) == {"recipe": "x", "linears": {"a": {"bits": 4}}}
    for bad, why in ((b"\xff\xfe", "not JSON"), (b"[1, 2]", "not a JSON object"), (b"{", "not JSON")):
        (tmp_path / outdir.MANIFEST).write_bytes(bad)
        with pytest.raises(PocketError, match=why):
            outdir.manifest(tmp_path)
