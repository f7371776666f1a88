"""openpi's msgpack-numpy wire format (``openpi_client.msgpack_numpy``), decoded safely.

- ``numpy.ndarray`` <-> ``{b"__ndarray__": True, b"data": <raw bytes, C order>, b"dtype": dtype.str,
  b"shape": [...]}`` (the map's keys are msgpack ``bin``, as openpi packs them);
- numpy scalars <-> ``{b"__npgeneric__": True, b"data": <item>, b"dtype": dtype.str}``.

Decoding refuses object, void and structured dtypes (openpi's own decoder would build object arrays
from raw bytes), checks that the data length matches shape and dtype, and turns any malformed input
into :class:`ProtocolError`. Decoded arrays are writable copies. Every decode runs under a
:class:`~policyserve.wire.gr00t.DecodeBudget` (values and decoded bytes relative to the wire size).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError
from .gr00t import ARRAY_COST, DEFAULT_BUDGET, DecodeBudget, DecodeStats, _Budget, _clip

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
    if len(value) > 32:
        raise ProtocolError(f"unknown array dtype {_clip(repr(value))}")
    try:
        dtype = np.dtype(value)
    except TypeError as exc:
        raise ProtocolError(f"unknown array dtype {_clip(repr(value))}: {_clip(str(exc))}") from None
    if dtype.hasobject or dtype.kind == "V" or dtype.fields is not None:
        raise ProtocolError(f"array dtype {_clip(repr(value))} is not allowed (object, void and structured dtypes "
                            "are refused)")
    return dtype


def _unpack(obj: dict, budget: _Budget | None = None) -> Any:
    if budget is not None:
        budget.spend(2 * len(obj) + 1, 100 + 80 * len(obj))
    if obj.get(_NDARRAY) is True:
        dtype = _dtype(obj.get(_DTYPE))
        data, shape = obj.get(_DATA), obj.get(_SHAPE)
        if not isinstance(data, bytes):
            raise ProtocolError(f"array data must be bytes, got {type(data).__name__}")
        if not isinstance(shape, (list, tuple)) or len(shape) > 32 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ProtocolError(f"array shape must be a list of at most 32 non-negative ints, got "
                                f"{_clip(repr(shape))}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise ProtocolError(f"array of shape {_clip(str(tuple(shape)))} and dtype {dtype.str} needs {expected} "
                                f"bytes of data, got {len(data)}")
        if budget is not None:
            budget.spend(ARRAY_COST, 112 + len(data))
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if obj.get(_NPGENERIC) is True:
        dtype = _dtype(obj.get(_DTYPE))
        try:
            return dtype.type(obj.get(_DATA))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"numpy scalar of dtype {dtype.str}: {_clip(str(exc))}") from None
    return obj


def unpackb(data: bytes, *, budget: DecodeBudget = DEFAULT_BUDGET, stats: DecodeStats | None = None) -> Any:
    """Decode one openpi message; :class:`ProtocolError` for anything malformed or over ``budget``.

    ``stats``, when given, receives what the decode cost (values, estimated decoded bytes).
    """
    size = len(data)
    account = _Budget(budget, size, None)
    longest = min(account.max_values, size)  # no container may claim more entries than the budget allows

    def on_list(items: list) -> list:
        account.spend(len(items) + 1, 88 + 40 * len(items))
        return items

    unpacker = msgpack.Unpacker(
        object_hook=lambda obj: _unpack(obj, account), list_hook=on_list, strict_map_key=False,
        max_buffer_size=max(size, 1), max_array_len=longest, max_map_len=longest, max_str_len=size,
        max_bin_len=size, max_ext_len=0)
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
        if unpacker.tell() != size:
            raise ProtocolError(f"message is not valid msgpack-numpy: {size - unpacker.tell()} extra bytes after it")
    except ProtocolError:
        raise
    except msgpack.OutOfData:
        raise ProtocolError("message is not valid msgpack-numpy: truncated") from None
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            raise ProtocolError(f"message too complex: a {size}-byte message may hold containers of at most "
                                f"{longest} entries, this one has a larger one") from None
        raise ProtocolError(f"message is not valid msgpack-numpy: ValueError: {_clip(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for malformed input
        raise ProtocolError(f"message is not valid msgpack-numpy: {type(exc).__name__}: {_clip(str(exc))}") from None
    if stats is not None:
        stats.wire_bytes, stats.values, stats.decoded_bytes = size, account.values, account.decoded_bytes
    return obj
