"""A bounds-checked walk over a GGUF file's header before any library reads it.

gguf-py's reader (and transformers, which uses it) trusts every count and length in the
header: a damaged or hostile file that declares an array of 2^63 items makes it loop and
allocate until memory runs out, and a tensor whose dimensions were changed is dequantized into
a buffer of any size. This walk checks each count against the bytes that remain, and each
tensor's data against the end of the file, in one pass that allocates nothing.

Layout (GGUF v2 and v3, little- or big-endian): magic ``GGUF``, uint32 version, uint64 tensor
count, uint64 key/value count; the key/values (string key, uint32 value type, value; a string
is a uint64 length and its bytes, an array a uint32 item type, a uint64 count and the items);
then the tensor infos (string name, uint32 dimension count, uint64 dimensions, uint32 GGML type,
uint64 offset into the data section, which starts at the next multiple of the alignment).
"""
from __future__ import annotations

import mmap
import os
import struct

from .errors import PocketError

FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Damaged(Exception):
    pass


class _Cursor:
    def __init__(self, buf, order: str):
        self.buf, self.pos, self.order = buf, 0, order

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Damaged(f"the header ends early (byte {self.pos} of {len(self.buf)})")
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def skip(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise _Damaged(f"{what} of {n:,} bytes runs past the end of the file (byte {self.pos})")
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.take("Q")
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start:self.pos])


def _value(c: _Cursor, vtype: int, depth: int = 0):
    """Skip one value; return it when it is a small scalar (the alignment needs it)."""
    if vtype in FIXED:
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[FIXED[vtype]]
        return c.take(fmt)
    if vtype == STRING:
        c.string("a string")
        return None
    if vtype != ARRAY or depth > 2:
        raise _Damaged(f"unknown value type {vtype} at byte {c.pos - 4}")
    itype, count = c.take("I"), c.take("Q")
    if itype in FIXED:
        c.skip(count * FIXED[itype], "an array")
    elif itype in (STRING, ARRAY):
        if count * 8 > len(c.buf) - c.pos:  # every item needs at least 8 bytes (its length or count)
            raise _Damaged(f"an array of {count:,} items runs past the end of the file (byte {c.pos})")
        for _ in range(count):
            if itype == STRING:
                c.string("a string")
            else:
                _value(c, ARRAY, depth + 1)
    else:
        raise _Damaged(f"unknown array item type {itype} at byte {c.pos - 12}")
    return None


def _walk(buf) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buf[:4]) != b"GGUF":
        raise _Damaged("it does not start with the GGUF magic")
    (version,) = struct.unpack_from("<I", buf, 4) if len(buf) >= 8 else (0,)
    order = ">" if version & 0xFFFF == 0 else "<"
    c = _Cursor(buf, order)
    c.pos = 4
    version = c.take("I")
    if version not in (2, 3):
        raise _Damaged(f"GGUF version {version} is not 2 or 3")
    n_tensors, n_kv = c.take("Q"), c.take("Q")
    if n_kv * 12 > len(buf) or n_tensors * 24 > len(buf):
        raise _Damaged(f"{n_kv:,} keys and {n_tensors:,} tensors cannot fit in {len(buf):,} bytes")
    alignment = 32
    for _ in range(n_kv):
        key = c.string("a key")
        v = _value(c, c.take("I"))
        if key == b"general.alignment":
            alignment = v
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"alignment {alignment} is not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")[:60].decode("utf-8", "replace")
        n_dims = c.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Damaged(f"tensor '{name}' has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= c.take("Q")
        ttype, offset = c.take("I"), c.take("Q")
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor '{name}' has unknown type {ttype}") from None
        if elements % block:
            raise _Damaged(f"tensor '{name}' has {elements:,} elements, not whole blocks of {block}")
        tensors.append((name, offset, elements // block * size))
    data = -(-c.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data + offset + nbytes > len(buf):
            raise _Damaged(f"tensor '{name}' ({nbytes:,} bytes at {data + offset:,}) runs past the "
                           f"end of the file ({len(buf):,} bytes)")


def check(path: str | os.PathLike) -> None:
    """Refuse, in one line, a GGUF file whose header does not fit inside the file."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise _Damaged("it is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk(buf)
    except _Damaged as e:
        raise PocketError(f"{path} is not a valid GGUF file: {e}; re-download or re-export it") from None
    except OSError as e:
        raise PocketError(f"cannot read {path}: {e.strerror or e}") from None
