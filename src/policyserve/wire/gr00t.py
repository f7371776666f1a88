"""msgpack + NPY codec, byte-compatible with GR00T's ``MsgSerializer``.

- ``numpy.ndarray`` <-> ``{"__ndarray_class__": True, "as_npy": <NPY v1.0 bytes>}`` (``np.save`` output,
  ``allow_pickle=False``).
- :class:`ModalityConfig` <-> ``{"__ModalityConfig_class__": True, "as_json": {field: value}}`` with enums
  by name. Decoding also accepts the older JSON-string ``as_json`` and the ``as_dict`` variant.
- numpy scalars become Python scalars; tuples and sets become lists.

Array bytes are copied once on the way out (into the single message buffer) and not at all on the
way in: decoded arrays are views of the received message, writable when the message buffer is (a
received ZeroMQ frame is), so policies may normalise in place as behind GR00T's server. msgpack
itself packs and unpacks everything but the ``bin`` payloads, which its Python API can only copy.

Decoding refuses pickled or object-dtype payloads, extension types and maps with non-string keys,
and turns any malformed input into :class:`ProtocolError`; it never unpickles or evaluates code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import struct
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError
from ..types import ModalityConfig, to_json_serializable

NDARRAY_TAG = "__ndarray_class__"
MODALITY_CONFIG_TAG = "__ModalityConfig_class__"
NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 10_000


def npy_header(arr: np.ndarray) -> bytes:
    """The exact NPY header ``np.save`` writes for ``arr`` (format 1.0)."""
    fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
    return _npy_header(arr.dtype, fortran, arr.shape)


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, fortran: bool, shape: tuple[int, ...]) -> bytes:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape}
    with _BytesSink() as sink:
        np.lib.format.write_array_header_1_0(sink, header)
        return sink.getvalue()


class _BytesSink:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def __enter__(self) -> _BytesSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._parts.clear()


def _npy_parts(arr: np.ndarray) -> tuple[bytes, Any]:
    """(NPY header, data buffer in file order) of ``arr``, without copying contiguous data."""
    if arr.dtype.hasobject:
        raise TypeError(f"cannot encode an object-dtype array (dtype {arr.dtype}); use a numeric or str dtype")
    header = npy_header(arr)
    if not arr.size:
        return header, b""
    if arr.flags.c_contiguous:
        return header, memoryview(arr.reshape(-1).view(np.uint8))
    if arr.flags.f_contiguous:  # np.save writes these with fortran_order=True, in memory order
        return header, memoryview(arr.T.reshape(-1).view(np.uint8))
    return header, memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def encode_ndarray(arr: np.ndarray) -> bytes:
    """NPY v1.0 bytes of ``arr``, identical to ``np.save(buf, arr, allow_pickle=False)``."""
    return b"".join(_npy_parts(arr))


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


_NDARRAY_PREFIX = msgpack.packb(NDARRAY_TAG) + msgpack.packb(True) + msgpack.packb("as_npy")
_PLAIN = (str, int, float, bool, bytes, type(None))


def _to_wire(obj: Any) -> Any:
    """Objects the codec maps to plain msgpack structures (everything but arrays)."""
    if isinstance(obj, ModalityConfig):
        return {MODALITY_CONFIG_TAG: True, "as_json": to_json_serializable(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, Enum):
        return obj.name
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_json_serializable(obj)
    raise TypeError(f"cannot serialize object of type {type(obj).__name__}")


def _encode(obj: Any, packer: msgpack.Packer, out: list, depth: int = 0) -> None:
    if isinstance(obj, _PLAIN):
        out.append(packer.pack(obj))
    elif isinstance(obj, dict):
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            _encode(key, packer, out, depth + 1)
            _encode(value, packer, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        out.append(packer.pack_array_header(len(obj)))
        for item in obj:
            _encode(item, packer, out, depth + 1)
    elif isinstance(obj, np.ndarray):
        header, data = _npy_parts(obj)
        out += (b"\x82", _NDARRAY_PREFIX, _bin_header(len(header) + len(data)), header, data)
    else:
        if depth > MAX_DEPTH:
            raise ValueError(f"message nested deeper than {MAX_DEPTH} levels")
        _encode(_to_wire(obj), packer, out, depth + 1)


def packb(obj: Any) -> bytes:
    """Encode a message for the wire (the bytes GR00T's ``MsgSerializer.to_bytes`` writes)."""
    out: list = []
    _encode(obj, msgpack.Packer(use_bin_type=True, autoreset=True), out)
    return b"".join(out)


def decode_ndarray(data: Any, *, writable: bool = True) -> np.ndarray:
    """Parse NPY bytes without pickle; object dtypes are refused.

    The result is a view of ``data`` when that is possible: ``data`` is aligned for the dtype and,
    with ``writable=True``, itself writable. Otherwise it is a copy.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"ndarray payload 'as_npy' must be bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != NPY_MAGIC:
        raise ProtocolError("ndarray payload is not in NPY format (bad magic)")
    major = view[6]
    if major == 1:
        hlen, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise ProtocolError(f"unsupported NPY format version {major}.{view[7]}")
    if hlen > _MAX_NPY_HEADER or start + hlen > len(view):
        raise ProtocolError("NPY header length is invalid or truncated")
    dtype, fortran, shape, count = _parse_npy_header(bytes(view[start : start + hlen]))
    offset = start + hlen
    nbytes = count * dtype.itemsize
    if len(view) - offset != nbytes:
        raise ProtocolError(
            f"NPY data size mismatch: header says shape {shape} dtype {dtype} ({nbytes} bytes), "
            f"payload has {len(view) - offset} bytes"
        )
    flat = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    if (writable and not flat.flags.writeable) or not flat.flags.aligned:
        flat = flat.copy()
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(text: bytes) -> tuple[np.dtype, bool, tuple[int, ...], int]:
    """(dtype, fortran_order, shape, element count) of an NPY header; cached, as headers repeat."""
    try:
        header = ast.literal_eval(text.decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a protocol error
        raise ProtocolError(f"invalid NPY header: {exc}") from exc
    if dtype.hasobject:
        raise ProtocolError(f"refusing object-dtype array (dtype {dtype}): pickled payloads are not accepted")
    if not isinstance(fortran, bool) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"invalid NPY header fields: fortran_order={fortran!r} shape={shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return dtype, fortran, shape, count


def _decode_modality_config(obj: dict) -> ModalityConfig:
    payload = obj.get("as_json", obj.get("as_dict"))
    if isinstance(payload, (str, bytes)):
        payload = json.loads(payload)
    if not isinstance(payload, dict):
        raise ProtocolError("ModalityConfig payload must be a map under 'as_json'")
    try:
        return ModalityConfig.from_json(payload)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid ModalityConfig payload: {exc}") from exc


MAX_DEPTH = 64
"""Deepest nesting of maps and arrays accepted (observations use 4)."""

_FIXED = {0xCA: (">f", 4), 0xCB: (">d", 8), 0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8),
          0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8)}
_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


class _Decoder:
    """msgpack decoder whose ``bin`` values are views of the input (no copy of array bytes)."""

    def __init__(self, data: memoryview, writable: bool) -> None:
        self.data, self.writable, self.pos, self.size = data, writable, 0, len(data)

    def _need(self, size: int) -> int:
        """Start of the next ``size`` bytes (advancing past them)."""
        start = self.pos
        end = start + size
        if end > self.size:
            raise ProtocolError(f"could not decode msgpack message: truncated (needs {end} bytes, has {self.size})")
        self.pos = end
        return start

    def value(self, depth: int = 0) -> Any:
        if self.pos >= self.size:
            raise ProtocolError(f"could not decode msgpack message: truncated (needs {self.pos + 1} bytes, "
                                f"has {self.size})")
        code = self.data[self.pos]
        self.pos += 1
        if code <= 0x7F:
            return code
        if code >= 0xE0:
            return code - 0x100
        if code >= 0xA0 and code <= 0xBF:
            return self._str(code & 0x1F)
        if code >= 0x80 and code <= 0x9F:
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"message nested deeper than {MAX_DEPTH} levels")
            return self._map(code & 0x0F, depth) if code <= 0x8F else self._array(code & 0x0F, depth)
        if code == 0xC0:
            return None
        if code == 0xC2 or code == 0xC3:
            return code == 0xC3
        if code in _FIXED:
            fmt, size = _FIXED[code]
            return struct.unpack_from(fmt, self.data, self._need(size))[0]
        length = _LENGTH.get(code)
        if length is None:
            if code == 0xC1:
                raise ProtocolError("could not decode msgpack message: invalid byte 0xc1")
            raise ProtocolError(f"msgpack extension types are not accepted (type byte 0x{code:02x})")
        n = int.from_bytes(self.data[self._need(length) : self.pos], "big")
        if code <= 0xC6:
            start = self._need(n)
            return self.data[start : self.pos]
        if code <= 0xDB:
            return self._str(n)
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"message nested deeper than {MAX_DEPTH} levels")
        return self._array(n, depth) if code <= 0xDD else self._map(n, depth)

    def _str(self, size: int) -> str:
        start = self._need(size)
        try:
            return str(self.data[start : self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"string is not valid UTF-8: {exc}") from exc

    def _count(self, n: int) -> int:
        if n > self.size - self.pos:  # every element takes at least one byte
            raise ProtocolError(f"could not decode msgpack message: truncated ({n} elements declared, "
                                f"{self.size - self.pos} bytes left)")
        return n

    def _array(self, n: int, depth: int) -> list:
        value = self.value
        items = [value(depth + 1) for _ in range(self._count(n))]
        return [bytes(v) if type(v) is memoryview else v for v in items]

    def _map(self, n: int, depth: int) -> Any:
        value = self.value
        obj: dict[str, Any] = {}
        for _ in range(self._count(n)):
            key = value(depth + 1)
            if type(key) is not str:
                shown = "bytes" if isinstance(key, memoryview) else type(key).__name__
                raise ProtocolError(f"map keys must be strings, got a {shown} key ({key!r:.40})")
            obj[key] = value(depth + 1)
        if NDARRAY_TAG in obj:
            return decode_ndarray(obj.get("as_npy"), writable=self.writable)
        for key, item in obj.items():
            if type(item) is memoryview:
                obj[key] = bytes(item)
        if MODALITY_CONFIG_TAG in obj:
            return _decode_modality_config(obj)
        return obj


def unpackb(data: bytes | bytearray | memoryview, *, writable: bool = True, max_size: int | None = None) -> Any:
    """Decode a wire message; any malformed input raises :class:`ProtocolError`.

    Arrays are views of ``data`` where possible. With ``writable=True`` (default) they are writable:
    views of a writable buffer (a ZeroMQ frame, a bytearray), else copies. ``writable=False`` allows
    read-only views of an immutable buffer.
    """
    size = len(data)
    if max_size is not None and size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the maximum message size of {max_size} bytes")
    decoder = _Decoder(memoryview(data).cast("B"), writable)
    try:
        obj = decoder.value()
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - defensive: hostile input must only ever raise ProtocolError
        raise ProtocolError(f"could not decode msgpack message ({type(exc).__name__}: {exc})") from exc
    if decoder.pos != size:
        raise ProtocolError(f"could not decode msgpack message: {size - decoder.pos} extra bytes after the message")
    return bytes(obj) if isinstance(obj, memoryview) else obj
