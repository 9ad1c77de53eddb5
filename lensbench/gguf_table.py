"""The tensor table of a GGUF file: each tensor's name, shape, type and bytes, and the file's architecture.

`gguf.GGUFReader` parses every metadata value into numpy objects: for a tokenizer's vocabulary and merges that
is some hundred thousand small arrays, much of it held in reference cycles until the garbage collector runs.
Loading a file's weights packed needs none of those values: this reads the header, steps over every metadata
value but the two it needs (`general.architecture`, `general.alignment`) without building it, and reads a
tensor's bytes into fresh memory (`offload.read`: no mapping of the file counts in the process's memory while
the model loads).

The layout is the GGUF specification's (ggml-org/ggml, docs/gguf.md), versions 2 and 3, little-endian.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LensbenchError
from .offload import Stored, read

# metadata value types: fixed sizes in bytes; 8 is a string, 9 an array
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the innermost (contiguous) dimension first
    type: str  # the GGML type's name: F32, Q4_1, Q8_0, Q4_K, ...
    offset: int  # from the file's start
    nbytes: int


@dataclass(frozen=True)
class Table:
    path: Path
    architecture: str
    tensors: dict[str, TensorInfo]

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes (uint8), read into fresh memory (`offload.read`)."""
        return read(Stored(str(self.path), info.offset, info.nbytes, torch.uint8, (info.nbytes,))).numpy()


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise _truncated(self.path) from None
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise _truncated(self.path)
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8", errors="replace")

    def skip(self, vtype: int) -> None:
        if vtype == _STRING:
            n = self.take("Q")  # read first: `self.pos += self.take(...)` would add to the position before the read
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self.take("IQ")
            if etype in _SIZES:
                self.pos += count * _SIZES[etype]
            else:
                for _ in range(count):
                    self.skip(etype)
        elif vtype in _SIZES:
            self.pos += _SIZES[vtype]
        else:
            raise LensbenchError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}; the file is "
                                 f"corrupt or from a newer GGUF version: load it without packed=True")


def read_table(path: Path) -> Table:
    """`path`'s tensor table (module docstring). One line naming the problem for a file that is not GGUF v2/v3."""
    import gguf  # optional: gguf (with transformers' GGUF support), for its type names and sizes

    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise LensbenchError(f"{path} is not a GGUF file (no GGUF magic bytes at its start); download it again")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise LensbenchError(f"{path}: GGUF version {version} (big-endian, or not 2 or 3) is not read packed: "
                                 f"load it without packed=True")
        # parsed through a mapping, which touches only the header's pages and is closed with the file
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path), n_tensors, n_kv, gguf)


def _parse(cur: _Cursor, n_tensors: int, n_kv: int, gguf) -> Table:
    path = cur.path
    cur.pos = 24
    arch, alignment = None, 32
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("I")
        if key == "general.architecture" and vtype == _STRING:
            arch = cur.string()
        elif key == "general.alignment" and vtype == 4:
            alignment = cur.take("I")
        else:
            cur.skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = cur.take("I")
        shape = tuple(cur.take("Q") for _ in range(dims))
        type_id, offset = cur.take("IQ")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise LensbenchError(f"{path}: tensor {name} has GGML type {type_id}, which gguf {gguf.__version__} "
                                 f"does not know: load it without packed=True") from None
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        infos.append((name, shape, qtype.name, offset, int(np.prod(shape)) // block * size))
    if arch is None:
        raise LensbenchError(f"{path} names no general.architecture; load it without packed=True")
    start = -(-cur.pos // alignment) * alignment
    size = path.stat().st_size
    tensors = {}
    for name, shape, qtype, offset, nbytes in infos:
        if start + offset + nbytes > size:
            raise _truncated(path)
        tensors[name] = TensorInfo(name, shape, qtype, start + offset, nbytes)
    return Table(path, arch, tensors)


def _truncated(path: Path) -> LensbenchError:
    return LensbenchError(f"{path} is truncated or corrupt (its GGUF header or a tensor runs past the end of the "
                          f"file); download it again")
