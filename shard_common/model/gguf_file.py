"""A GGUF file's metadata and tensor table, read fast; the tensor bytes stay memory-mapped.

``gguf.GGUFReader`` builds several numpy views per value, which for a 262k-token vocabulary
(Gemma 3) takes ~9 s before any weight is touched. This reader decodes the same
layout (GGUF v2/v3, little-endian) straight from the mapped bytes: numeric arrays in one
``frombuffer``, each string in one slice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

# GGUF value types -> numpy dtype; 7 is bool, 8 string, 9 array.
_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_DENSE = {QT.F32: np.float32, QT.F16: np.float16}


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFTensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # (rows, cols): GGUF lists dimensions fastest-first; this is reversed
    data: np.ndarray  # F32/F16: the values in ``shape``; anything else: rows of raw bytes


class _Cursor:
    def __init__(self, buffer: np.ndarray, path: Path):
        self.view, self.size, self.path, self.pos = memoryview(buffer), len(buffer), path, 0

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, file has {self.size})")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        value = struct.unpack_from(fmt, self.view, self.pos)[0]
        self.pos += n
        return value

    def raw(self, n: int) -> bytes:
        self._need(n)
        out = self.view[self.pos:self.pos + n].tobytes()
        self.pos += n
        return out

    def string(self) -> str:
        return self.raw(self.scalar("<Q")).decode("utf-8", errors="replace")

    def numbers(self, dtype: np.dtype, count: int) -> np.ndarray:
        self._need(count * dtype.itemsize)
        out = np.frombuffer(self.view, dtype=dtype.newbyteorder("<"), count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return out

    def value(self, kind: int):
        if kind in _NUMERIC:
            v = self.numbers(np.dtype(_NUMERIC[kind]), 1)[0]
            return bool(v) if kind == 7 else v.item()
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = self.scalar("<I"), self.scalar("<Q")
            if inner == _STRING:
                return [self.string() for _ in range(count)]
            if inner not in _NUMERIC:
                return [self.value(inner) for _ in range(count)]
            return self.numbers(np.dtype(_NUMERIC[inner]), count).tolist()
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {kind}")


class GGUFFile:
    """``fields``: key -> Python value (str, int, float, bool, or a list of them);
    ``tensors``: in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(data, self.path)
        if cur.raw(4) != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file (bad magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = cur.string()
            self.fields[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-cur.pos // alignment) * alignment
        self.tensors = [self._tensor(data, start, *info) for info in infos]

    def _tensor(self, data: np.ndarray, start: int, name: str, dims: list[int], raw_type: int, offset: int) -> GGUFTensor:
        try:
            qtype = QT(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor {name} has unknown type {raw_type}") from None
        shape = tuple(reversed(dims))
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        elements = int(np.prod(dims))
        if dims[0] % block:
            raise GGUFFormatError(f"{self.path}: tensor {name} rows of {dims[0]} are not whole {qtype.name} blocks")
        n_bytes = elements // block * block_bytes
        begin = start + offset
        if begin + n_bytes > len(data):
            raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file")
        raw = data[begin:begin + n_bytes]
        if qtype in _DENSE:
            values = raw.view(_DENSE[qtype]).reshape(shape)
        else:
            values = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
        return GGUFTensor(name, qtype, shape, values)
