"""A GGUF file's header: its metadata as Python values and where each tensor lies, read with ``struct``.

``gguf.GGUFReader`` reads the same layout but makes a numpy view of every value, which for a vocabulary
and its merges (~100,000 strings in the demo model) took 3 of the 6 seconds from the command to the first
token; this reads them in ~0.1 s.  Tensors are numpy views of a copy-on-write mapping (writable without
touching the file), typed and shaped as ``GGUFReader`` gives them: F32/F16 as typed arrays, every other
type as raw bytes, one row of blocks per row (``gguf.quants`` dequantizes those).

Layout (little-endian; llama.cpp's ggml/docs/gguf.md): magic "GGUF", version u32 (2 or 3), tensor count
u64, metadata count u64; each metadata entry a string key, a u32 value type and the value (a string is a u64
length and UTF-8 bytes; an array a u32 element type, a u64 count and the elements); each tensor a string
name, u32 dimension count, u64 dimensions (innermost first), u32 ggml type and u64 offset; then the tensor
data, from the next multiple of ``general.alignment`` (32 by default).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from ..errors import UnsupportedError

V = GGUFValueType
SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "<?"}
TYPED = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}  # as GGUFReader types them
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class TensorInfo(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as the file lists it: innermost first
    n_bytes: int
    data: np.ndarray  # row-major, outermost first; raw bytes for block-quantized types


class Header(NamedTuple):
    fields: dict[str, Any]  # the metadata, plus GGUF.version, GGUF.tensor_count and GGUF.kv_count
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: struct.Struct) -> Any:
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def string(self) -> str:
        n = self.unpack(_U64)
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            etype, count = GGUFValueType(self.unpack(_U32)), self.unpack(_U64)
            if etype in SCALARS:  # one numpy read for the whole array (token types, scores)
                dtype = np.dtype(SCALARS[etype])
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return values
            if etype == V.STRING:  # the vocabulary and its merges: this loop is most of the header's time
                buf, pos, unpack, out = self.buf, self.pos, _U64.unpack_from, []
                for _ in range(count):
                    n = unpack(buf, pos)[0]
                    out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                    pos += 8 + n
                if pos > len(buf):
                    raise ValueError(f"an array of {count} strings at offset {self.pos} runs past the end of the file")
                self.pos = pos
                return out
            return [self.value(etype) for _ in range(count)]
        if vtype in SCALARS:
            return self.unpack(struct.Struct(SCALARS[vtype]))
        raise ValueError(f"unknown metadata value type {vtype}")


def read_header(path: str | Path) -> Header:
    """The metadata and tensors of a GGUF file.  ValueError (or struct.error) for a file that is not one or
    is cut short; UnsupportedError for a big-endian one."""
    data = np.memmap(path, mode="c")
    c = _Cursor(memoryview(data))
    if c.unpack(_U32) != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    version = c.unpack(_U32)
    if version & 0xFFFF == 0:  # the bytes of a small number, swapped
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, which this reader does not know")
    n_tensors, n_fields = c.unpack(_U64), c.unpack(_U64)
    fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_fields}
    for _ in range(n_fields):
        key = c.string()
        if key in fields:
            raise ValueError(f"metadata {key!r} appears twice")
        try:
            fields[key] = c.value(c.unpack(_U32))
        except UnicodeDecodeError:
            raise ValueError(f"metadata {key!r} is not valid UTF-8") from None
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.unpack(_U64) for _ in range(c.unpack(_U32)))
        infos.append((name, GGMLQuantizationType(c.unpack(_U32)), dims, c.unpack(_U64)))
    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-c.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, qtype, dims, offset in infos:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n_elements * type_size // block
        begin = start + offset
        if begin + n_bytes > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        shape = tuple(reversed(dims))
        if qtype in TYPED:
            array = data[begin:begin + n_bytes].view(TYPED[qtype]).reshape(shape)
        else:
            array = data[begin:begin + n_bytes].reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(TensorInfo(name, qtype, dims, n_bytes, array))
    return Header(fields, tensors)
