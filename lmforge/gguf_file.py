"""A GGUF file opened lazily: header, metadata and tensor table, without an object per metadata element.

gguf.GGUFReader builds two numpy views for every string of every metadata array when it opens a file: for
SmolLM2's 49k tokens and 49k merges that is ~160 MB of Python objects, and ~0.7 GB for Gemma-3's 262k vocabulary,
before a single weight is read. `GGUFFile` walks the same layout once, keeps only where each value is, and
decodes a value when it is asked for. Tensor data are read-only numpy views of a memory map, shaped as gguf's
reader shapes them, so the conversion code works on either. The type tables (GGUFValueType,
GGMLQuantizationType, GGML_QUANT_SIZES) come from the gguf package.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; each
metadata entry is a string key, a u32 value type and the value (an array is u32 element type, u64 count,
elements); each tensor entry is a string name, u32 n_dims, u64 dims, u32 type, u64 offset; tensor data start at
the next multiple of `general.alignment` (default 32). A string is a u64 byte length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_STRUCT = {  # value type -> struct code (standard sizes, little-endian with "<")
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_SCALAR = {k: np.dtype("<" + c) for k, c in _STRUCT.items()}  # value type -> numpy dtype of its array elements
_PLAIN = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,  # element arrays, not bytes
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (truncated, corrupt, big-endian, unknown version or type)."""


@dataclass
class Field:
    """One metadata value: where it is, decoded by `contents()` (a Python scalar, str, or list of them)."""

    name: str
    types: list[GGUFValueType]  # [type] for a scalar or string, [ARRAY, element type] for an array
    offset: int  # of the value (for an array: of its first element)
    count: int = 1  # elements of an array
    _file: GGUFFile | None = field(default=None, repr=False)

    def contents(self) -> Any:
        f = self._file
        if f is None:
            raise GGUFFormatError(f"field {self.name!r}: not attached to a GGUFFile")
        if self.types[0] != GGUFValueType.ARRAY:
            return f._value(self.types[0], self.offset)[0]
        kind = self.types[-1]
        if kind == GGUFValueType.STRING:
            out, off = [], self.offset
            for _ in range(self.count):
                s, off = f._string(off)
                out.append(s)
            return out
        if kind not in _SCALAR:
            raise GGUFFormatError(f"field {self.name!r}: arrays of {kind.name} are not supported")
        return np.frombuffer(f.data, _SCALAR[kind], self.count, self.offset).tolist()


@dataclass
class Tensor:
    """One tensor of the table, with the attributes of gguf's ReaderTensor that the loaders use."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # GGUF order: innermost dimension first
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray  # read-only view: elements (float/int types) or bytes per row (quantized types)


class GGUFFile:
    """`fields` (name -> Field, in file order) and `tensors` (list of Tensor) of a GGUF file. Raises
    GGUFFormatError for a file that is not GGUF, truncated or corrupt, or FileNotFoundError."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = np.memmap(self.path, mode="r")
        self._buf = memoryview(self.data)
        self.fields: dict[str, Field] = {}
        self.tensors: list[Tensor] = []
        off = self._parse_header()
        self.data_offset = off

    def release(self, t: Tensor) -> None:
        """Drop the mapped pages of a tensor already converted from the resident set (they are read from the file
        again if touched): a loader that converts tensor by tensor then never holds the whole file in RSS."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError):
            pass  # advice only

    # ---- reading values ------------------------------------------------------------------------
    def _unpack(self, fmt: str, off: int) -> tuple:
        try:
            return struct.unpack_from(fmt, self._buf, off)
        except struct.error:
            raise GGUFFormatError(f"truncated at byte {off} (file is {len(self._buf)} bytes)") from None

    def _string(self, off: int) -> tuple[str, int]:
        (n,) = self._unpack("<Q", off)
        end = off + 8 + n
        if end > len(self._buf):
            raise GGUFFormatError(f"string at byte {off} runs past the end of the file")
        try:
            return bytes(self._buf[off + 8: end]).decode("utf-8"), end
        except UnicodeDecodeError:
            raise GGUFFormatError(f"string at byte {off} is not UTF-8") from None

    def _value(self, kind: GGUFValueType, off: int) -> tuple[Any, int]:
        """(value, offset after it) of a scalar or string."""
        if kind == GGUFValueType.STRING:
            return self._string(off)
        dt = _SCALAR.get(kind)
        if dt is None:
            raise GGUFFormatError(f"value type {kind!r} at byte {off} is not a scalar")
        (v,) = self._unpack("<" + _STRUCT[kind], off)
        return v, off + dt.itemsize

    def _skip(self, kind: GGUFValueType, off: int, count: int) -> int:
        """Offset after `count` values of `kind` starting at `off` (strings are walked, nothing is decoded)."""
        if kind in _SCALAR:
            end = off + _SCALAR[kind].itemsize * count
        elif kind == GGUFValueType.STRING:
            end = off
            for _ in range(count):
                (n,) = self._unpack("<Q", end)
                end += 8 + n
        else:
            raise GGUFFormatError(f"array of {kind.name} at byte {off} is not supported")
        if end > len(self._buf):
            raise GGUFFormatError(f"value at byte {off} runs past the end of the file")
        return end

    @staticmethod
    def _type(v: int, off: int) -> GGUFValueType:
        try:
            return GGUFValueType(v)
        except ValueError:
            raise GGUFFormatError(f"unknown metadata value type {v} at byte {off}") from None

    # ---- layout --------------------------------------------------------------------------------
    def _parse_header(self) -> int:
        magic, version = self._unpack("<4sI", 0)
        if magic != b"GGUF":
            raise GGUFFormatError(f"starts with {magic!r}, not b'GGUF'")
        if version & 0xFFFF == 0:
            raise GGUFFormatError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._unpack("<QQ", 8)
        off = 24
        for _ in range(n_kv):
            key, off = self._string(off)
            (t,) = self._unpack("<I", off)
            kind, off = self._type(t, off), off + 4
            if kind == GGUFValueType.ARRAY:
                et, count = self._unpack("<IQ", off)
                sub = self._type(et, off)
                f = Field(key, [kind, sub], off + 12, count, self)
                off = self._skip(sub, off + 12, count)
            else:
                f = Field(key, [kind], off, 1, self)
                off = self._skip(kind, off, 1)
            if key in self.fields:
                raise GGUFFormatError(f"metadata key {key!r} appears twice")
            self.fields[key] = f
        infos = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            (nd,) = self._unpack("<I", off)
            if nd > 8:
                raise GGUFFormatError(f"tensor {name!r}: {nd} dimensions")
            dims = self._unpack(f"<{nd}Q", off + 4)
            ttype, toff = self._unpack("<IQ", off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            infos.append((name, dims, ttype, toff))
        align = self.fields.get("general.alignment")
        a = 32 if align is None else int(align.contents())
        if a <= 0 or a & (a - 1):
            raise GGUFFormatError(f"general.alignment {a} is not a power of two")
        start = off + (-off) % a
        seen: set[str] = set()
        for name, dims, ttype, toff in infos:
            if name in seen:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, ttype, start + toff))
        return start

    def _tensor(self, name: str, dims: tuple[int, ...], ttype: int, off: int) -> Tensor:
        try:
            kind = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r}: unknown type {ttype}") from None
        block, size = GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims)) if dims else 1
        n_bytes = n * size // block
        shape = tuple(reversed(dims))  # numpy order: outermost first
        if off + n_bytes > len(self._buf):
            raise GGUFFormatError(f"tensor {name!r} extends past the end of the file at {len(self._buf)} bytes")
        if kind in _PLAIN:
            data = np.frombuffer(self._buf, _PLAIN[kind], n, off).reshape(shape)
        else:
            if dims[0] % block:
                raise GGUFFormatError(f"tensor {name!r}: row of {dims[0]} is not whole {kind.name} blocks")
            data = np.frombuffer(self._buf, np.uint8, n_bytes, off).reshape(*shape[:-1], shape[-1] // block * size)
        return Tensor(name, kind, np.array(dims, dtype=np.uint64), n, n_bytes, off, data)
