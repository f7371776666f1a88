"""openpi's msgpack-numpy wire format (``openpi_client.msgpack_numpy``), decoded safely.

- ``numpy.ndarray`` <-> ``{b"__ndarray__": True, b"data": <raw bytes, C order>, b"dtype": dtype.str,
  b"shape": [...]}`` (the map's keys are msgpack ``bin``, as openpi packs them);
- numpy scalars <-> ``{b"__npgeneric__": True, b"data": <item>, b"dtype": dtype.str}``.

Decoding refuses object, void and structured dtypes (openpi's own decoder would build object arrays
from raw bytes), checks that the data length matches shape and dtype, and turns any malformed input
into :class:`ProtocolError`. Decoded arrays are writable copies.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError

__all__ = ["packb", "unpackb"]

_NDARRAY, _NPGENERIC = b"__ndarray__", b"__npgeneric__"
_DATA, _DTYPE, _SHAPE = b"data", b"dtype", b"shape"


def _pack(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise TypeError(f"cannot encode dtype {obj.dtype} in openpi's format")
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: True, _DATA: obj.tobytes(), _DTYPE: obj.dtype.str, _SHAPE: obj.shape}
    if isinstance(obj, np.generic):
        return {_NPGENERIC: True, _DATA: obj.item(), _DTYPE: obj.dtype.str}
    raise TypeError(f"cannot serialize object of type {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Encode ``obj`` as openpi's ``msgpack_numpy.packb`` does."""
    return msgpack.packb(obj, default=_pack)


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise ProtocolError(f"array dtype must be a string such as '<f4', got {type(value).__name__}")
    try:
        dtype = np.dtype(value)
    except TypeError as exc:
        raise ProtocolError(f"unknown array dtype {value!r}: {exc}") from None
    if dtype.hasobject or dtype.kind == "V" or dtype.fields is not None:
        raise ProtocolError(f"array dtype {value!r} is not allowed (object, void and structured dtypes are refused)")
    return dtype


def _unpack(obj: dict) -> Any:
    if obj.get(_NDARRAY) is True:
        dtype = _dtype(obj.get(_DTYPE))
        data, shape = obj.get(_DATA), obj.get(_SHAPE)
        if not isinstance(data, bytes):
            raise ProtocolError(f"array data must be bytes, got {type(data).__name__}")
        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ProtocolError(f"array shape must be a list of non-negative ints, got {shape!r}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise ProtocolError(f"array of shape {tuple(shape)} and dtype {dtype.str} needs {expected} bytes of data, "
                                f"got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if obj.get(_NPGENERIC) is True:
        dtype = _dtype(obj.get(_DTYPE))
        try:
            return dtype.type(obj.get(_DATA))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"numpy scalar of dtype {dtype.str}: {exc}") from None
    return obj


def unpackb(data: bytes) -> Any:
    """Decode one openpi message; :class:`ProtocolError` for anything malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for malformed input
        raise ProtocolError(f"message is not valid msgpack-numpy: {type(exc).__name__}: {exc}") from None
