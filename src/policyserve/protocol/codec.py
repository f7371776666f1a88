"""msgpack + NPY codec, byte-compatible with GR00T's ``MsgSerializer``.

- ``numpy.ndarray`` <-> ``{"__ndarray_class__": True, "as_npy": <NPY v1.0 bytes>}`` (``np.save`` output,
  ``allow_pickle=False``).
- :class:`ModalityConfig` <-> ``{"__ModalityConfig_class__": True, "as_json": {field: value}}`` with enums
  by name. Decoding also accepts the older JSON-string ``as_json`` and the ``as_dict`` variant.
- numpy scalars become Python scalars; tuples and sets become lists.

Decoding refuses pickled or object-dtype payloads and turns any malformed input into
:class:`ProtocolError`; it never unpickles or evaluates code.
"""

from __future__ import annotations

import ast
import dataclasses
import json
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
    header = np.lib.format.header_data_from_array_1_0(arr)
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


def encode_ndarray(arr: np.ndarray) -> bytes:
    """NPY v1.0 bytes of ``arr``, identical to ``np.save(buf, arr, allow_pickle=False)``."""
    if arr.dtype.hasobject:
        raise TypeError(f"cannot encode an object-dtype array (dtype {arr.dtype}); use a numeric or str dtype")
    header = npy_header(arr)
    if not arr.size:
        data: Any = b""
    elif arr.flags.c_contiguous:
        data = arr.reshape(-1).view(np.uint8)
    elif arr.flags.f_contiguous:  # np.save writes these with fortran_order=True, in memory order
        data = arr.T.reshape(-1).view(np.uint8)
    else:
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return b"".join((header, data))


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {NDARRAY_TAG: True, "as_npy": encode_ndarray(obj)}
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


def packb(obj: Any) -> bytes:
    """Encode a message for the wire."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def decode_ndarray(data: Any, *, writable: bool = True) -> np.ndarray:
    """Parse NPY bytes without pickle; object dtypes are refused.

    With ``writable=False`` the result is a read-only view of ``data`` when its alignment allows.
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
    try:
        header = ast.literal_eval(bytes(view[start : start + hlen]).decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a protocol error
        raise ProtocolError(f"invalid NPY header: {exc}") from exc
    if dtype.hasobject:
        raise ProtocolError(f"refusing object-dtype array (dtype {dtype}): pickled payloads are not accepted")
    if not isinstance(fortran, bool) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"invalid NPY header fields: fortran_order={fortran!r} shape={shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset = start + hlen
    nbytes = count * dtype.itemsize
    if len(view) - offset != nbytes:
        raise ProtocolError(
            f"NPY data size mismatch: header says shape {shape} dtype {dtype} ({nbytes} bytes), "
            f"payload has {len(view) - offset} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if writable or not flat.flags.aligned:
        flat = flat.copy()
    return flat.reshape(shape, order="F" if fortran else "C")


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


def _make_object_hook(writable: bool):
    def hook(obj: dict) -> Any:
        if NDARRAY_TAG in obj:
            return decode_ndarray(obj.get("as_npy"), writable=writable)
        if MODALITY_CONFIG_TAG in obj:
            return _decode_modality_config(obj)
        return obj

    return hook


_HOOK_WRITABLE = _make_object_hook(True)
_HOOK_VIEW = _make_object_hook(False)


def unpackb(data: bytes | memoryview, *, writable: bool = True, max_size: int | None = None) -> Any:
    """Decode a wire message; any malformed input raises :class:`ProtocolError`.

    ``writable=False`` lets decoded arrays be read-only views of the message (fewer copies).
    """
    size = len(data)
    if max_size is not None and size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the maximum message size of {max_size} bytes")
    try:
        return msgpack.unpackb(
            data,
            object_hook=_HOOK_WRITABLE if writable else _HOOK_VIEW,
            raw=False,
            strict_map_key=False,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on hostile input
        raise ProtocolError(f"could not decode msgpack message ({type(exc).__name__}: {exc})") from exc
