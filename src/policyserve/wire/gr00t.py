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

Hostile input costs at most O(its size): every decode runs under a :class:`DecodeBudget` (values
and decoded bytes allowed relative to the wire size, refused past it), and :func:`peek_request`
reads a request's ``endpoint`` and ``api_token`` without building its ``data``, so a server can
refuse an unauthenticated or unknown-endpoint message before decoding it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hmac
import json
import math
import re
import struct
import sys
import time
from collections.abc import Collection
from enum import Enum
from typing import Any, Callable

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


def decode_ndarray(data: Any, *, writable: bool = True, budget: _Budget | None = None) -> np.ndarray:
    """Parse NPY bytes without pickle; object dtypes are refused.

    The result is a view of ``data`` when that is possible: ``data`` is aligned for the dtype and,
    with ``writable=True``, itself writable. Otherwise it is a copy. ``budget`` (the decoder's) is
    charged for the array.
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
    dtype, fortran, shape, count, canonical = _parse_npy_header(bytes(view[start : start + hlen]))
    offset = start + hlen
    nbytes = count * dtype.itemsize
    if len(view) - offset != nbytes:
        raise ProtocolError(
            f"NPY data size mismatch: header says shape {_clip(str(shape))} dtype {dtype} ({nbytes} bytes), "
            f"payload has {len(view) - offset} bytes"
        )
    flat = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    copy = (writable and not flat.flags.writeable) or not flat.flags.aligned
    if budget is not None:
        budget.spend(ARRAY_COST if canonical else ARRAY_COST + hlen, 112 + 8 * len(shape) + nbytes * (1 + copy))
    if copy:
        flat = flat.copy()
    return flat.reshape(shape, order="F" if fortran else "C")


_CANONICAL_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][a-zA-Z]\d{0,5})', 'fortran_order': (True|False), 'shape': \(((?:\d{1,19}, )*\d{0,19},?)\), \} *\n")
"""The header ``np.save`` writes for a plain dtype; anything else takes the slower general parser."""


@functools.lru_cache(maxsize=256)
def _plain_dtype(descr: str) -> np.dtype:
    return np.lib.format.descr_to_dtype(descr)


def _npy_header_fields(text: bytes) -> tuple[Any, Any, Any, bool]:
    """(descr, fortran_order, shape, canonical) of an NPY header; ``canonical``: the fast path parsed it."""
    match = _CANONICAL_NPY_HEADER.fullmatch(text)
    if match is not None:
        descr, fortran, dims = match.groups()
        shape = tuple(int(d) for d in dims.replace(b",", b" ").split())
        return _plain_dtype(descr.decode("ascii")), fortran == b"True", shape, True
    header = ast.literal_eval(text.decode("latin1"))
    return np.lib.format.descr_to_dtype(header["descr"]), header["fortran_order"], tuple(header["shape"]), False


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(text: bytes) -> tuple[np.dtype, bool, tuple[int, ...], int, bool]:
    """(dtype, fortran_order, shape, element count, canonical) of an NPY header; cached, as headers repeat."""
    try:
        dtype, fortran, shape, canonical = _npy_header_fields(text)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a protocol error
        raise ProtocolError(f"invalid NPY header: {_clip(str(exc))}") from None
    if dtype.hasobject:
        raise ProtocolError(f"refusing object-dtype array (dtype {dtype}): pickled payloads are not accepted")
    if not isinstance(fortran, bool) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 32:
        raise ProtocolError(f"invalid NPY header fields: fortran_order={_clip(repr(fortran))} "
                            f"shape={_clip(repr(shape))} (at most 32 non-negative dimensions)")
    count = math.prod(shape)  # Python ints: a huge claimed shape cannot wrap around
    return dtype, fortran, shape, count, canonical


def _clip(text: str, limit: int = 200) -> str:
    """``text`` (client-supplied) escaped and cut to ``limit`` characters, for error messages."""
    shown = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(shown)} characters)"


@dataclasses.dataclass(frozen=True)
class DecodeBudget:
    """How much decoding one message may cost, relative to its size on the wire.

    A message of ``size`` bytes may decode to at most ``base_values + size // bytes_per_value``
    values (never more than ``max_values_cap``) (every map, array, key and scalar counts one; an ndarray counts :data:`ARRAY_COST`) and
    to at most ``base_bytes + bytes_ratio * size`` bytes of decoded objects (an estimate of what
    the decoded objects hold, zero-copy array data included). Past either, decoding stops with a
    :class:`ProtocolError` naming the limit, having done work proportional to the limit only.
    """

    base_values: int = 32_768
    """Values any message may hold, however small (about 1500 arrays, or 16,000 one-string language rows)."""
    bytes_per_value: int = 256
    """One more value allowed per this many wire bytes (a 16 MB message: 98k values, ~0.1 s to decode)."""
    max_values_cap: int = 262_144
    """No message, however large, decodes to more values (a 256 MB bomb is refused as fast as a 64 MB one)."""
    base_bytes: int = 8 << 20
    """Decoded bytes any message may take, however small."""
    bytes_ratio: float = 3.0
    """Decoded bytes allowed per wire byte on top of ``base_bytes``."""

    def max_values(self, size: int) -> int:
        """Most values a ``size``-byte message may decode to."""
        return min(self.max_values_cap, self.base_values + size // max(1, self.bytes_per_value))

    def max_bytes(self, size: int) -> int:
        """Most decoded bytes a ``size``-byte message may take."""
        return self.base_bytes + int(self.bytes_ratio * size)


DEFAULT_BUDGET = DecodeBudget()
"""The budget :func:`unpackb` applies unless given another."""

ARRAY_COST = 16
"""Values one ndarray counts for against a :class:`DecodeBudget` (its header parse and view)."""


@dataclasses.dataclass
class DecodeStats:
    """What decoding one message cost: filled in by :func:`unpackb` when passed one."""

    wire_bytes: int = 0
    values: int = 0
    """Values decoded, counted as :class:`DecodeBudget` counts them."""
    decoded_bytes: int = 0
    """Estimated bytes the decoded objects hold (array data included); what a byte-limited queue should count."""


class _Budget:
    """The running account of one decode against a :class:`DecodeBudget`."""

    __slots__ = ("values_left", "bytes_left", "max_values", "max_bytes", "size", "deadline", "_tick")

    def __init__(self, budget: DecodeBudget, size: int, deadline: float | None) -> None:
        self.max_values, self.max_bytes, self.size = budget.max_values(size), budget.max_bytes(size), size
        self.values_left, self.bytes_left, self.deadline, self._tick = self.max_values, self.max_bytes, deadline, 0

    def spend(self, values: int, nbytes: int) -> None:
        self.values_left -= values
        self.bytes_left -= nbytes
        if self.values_left < 0:
            raise ProtocolError(
                f"message too complex: a {self.size}-byte message may decode to at most {self.max_values} values "
                "(maps, arrays, keys, scalars; an ndarray counts " f"{ARRAY_COST}), this one has more")
        if self.bytes_left < 0:
            raise ProtocolError(
                f"message too large once decoded: a {self.size}-byte message may decode to at most "
                f"{self.max_bytes} bytes, this one to more")
        if self.deadline is not None:
            self._tick += 1
            if self._tick & 63 == 0 and time.monotonic() > self.deadline:
                raise ProtocolError("decoding ran past its deadline (message too complex to decode in time)")

    @property
    def values(self) -> int:
        return self.max_values - self.values_left

    @property
    def decoded_bytes(self) -> int:
        return self.max_bytes - self.bytes_left


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

    def __init__(self, data: memoryview, writable: bool, budget: _Budget) -> None:
        self.data, self.writable, self.pos, self.size = data, writable, 0, len(data)
        self.budget = budget

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
            text = str(self.data[start : self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"string is not valid UTF-8: {exc}") from None
        if size > 64:
            self.budget.spend(0, sys.getsizeof(text))
        return text

    def _count(self, n: int) -> int:
        if n > self.size - self.pos:  # every element takes at least one byte
            raise ProtocolError(f"could not decode msgpack message: truncated ({n} elements declared, "
                                f"{self.size - self.pos} bytes left)")
        return n

    def _array(self, n: int, depth: int) -> list:
        self.budget.spend(n + 1, 88 + 40 * n)
        value = self.value
        items = [value(depth + 1) for _ in range(self._count(n))]
        for i, v in enumerate(items):
            if type(v) is memoryview:
                self.budget.spend(0, len(v))
                items[i] = bytes(v)
        return items

    def _map(self, n: int, depth: int) -> Any:
        self.budget.spend(2 * n + 1, 100 + 80 * n)
        value = self.value
        obj: dict[str, Any] = {}
        for _ in range(self._count(n)):
            key = value(depth + 1)
            if type(key) is not str:
                shown = "bytes" if isinstance(key, memoryview) else type(key).__name__
                raise ProtocolError(f"map keys must be strings, got a {shown} key ({_clip(repr(key), 40)})")
            obj[key] = value(depth + 1)
        if NDARRAY_TAG in obj:
            return decode_ndarray(obj.get("as_npy"), writable=self.writable, budget=self.budget)
        for key, item in obj.items():
            if type(item) is memoryview:
                self.budget.spend(0, len(item))
                obj[key] = bytes(item)
        if MODALITY_CONFIG_TAG in obj:
            return _decode_modality_config(obj)
        return obj


def unpackb(
    data: bytes | bytearray | memoryview,
    *,
    writable: bool = True,
    max_size: int | None = None,
    budget: DecodeBudget = DEFAULT_BUDGET,
    stats: DecodeStats | None = None,
    deadline: float | None = None,
) -> Any:
    """Decode a wire message; any malformed input raises :class:`ProtocolError`.

    Arrays are views of ``data`` where possible. With ``writable=True`` (default) they are writable:
    views of a writable buffer (a ZeroMQ frame, a bytearray), else copies. ``writable=False`` allows
    read-only views of an immutable buffer.

    The decode stays within ``budget`` (see :class:`DecodeBudget`) and, when ``deadline`` (a
    ``time.monotonic()`` value) is given, stops with :class:`ProtocolError` once past it. ``stats``,
    when given, receives what the decode cost (its ``decoded_bytes`` is the size to queue by).
    """
    size = len(data)
    if max_size is not None and size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the maximum message size of {max_size} bytes")
    account = _Budget(budget, size, deadline)
    decoder = _Decoder(memoryview(data).cast("B"), writable, account)
    try:
        obj = decoder.value()
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - defensive: hostile input must only ever raise ProtocolError
        raise ProtocolError(f"could not decode msgpack message ({type(exc).__name__}: {_clip(str(exc))})") from None
    if decoder.pos != size:
        raise ProtocolError(f"could not decode msgpack message: {size - decoder.pos} extra bytes after the message")
    if stats is not None:
        stats.wire_bytes, stats.values, stats.decoded_bytes = size, account.values, account.decoded_bytes
    return bytes(obj) if isinstance(obj, memoryview) else obj


@dataclasses.dataclass(frozen=True)
class RequestHead:
    """What a server needs before decoding a request's payload: see :func:`peek_request`."""

    endpoint: str
    """The endpoint named, ``"get_action"`` when the request names none (as GR00T's server defaults)."""
    api_token: str | None
    """The token sent, ``None`` when absent or not a string."""
    has_data: bool
    """Whether the request carries a ``data`` entry (not decoded)."""


_PEEK_CHUNK = 4096

MAX_REQUEST_KEYS = 16
"""Most entries :func:`peek_request` accepts in a request's top-level map (GR00T sends at most 3)."""

_STR_TYPES = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}


def peek_request(
    data: bytes | bytearray | memoryview,
    *,
    expected_token: str | None = None,
    budget: DecodeBudget = DEFAULT_BUDGET,
    decoded_endpoints: Collection[str] = (),
) -> RequestHead:
    """Read a GR00T request's ``endpoint`` and ``api_token`` without building its ``data``.

    The payload is skipped by msgpack's C scanner, which builds no objects (a few nanoseconds per
    value, ~80 ms for a 12 MB bomb of empty arrays): call this before :func:`unpackb` to refuse an
    unknown-endpoint request, and to skip decoding altogether for endpoints that take no input.

    With ``expected_token`` (the server's token) an unauthenticated request costs O(1): the token
    must come before ``data`` or be the message's last entry (as every GR00T client sends it), so
    when ``data`` is reached with no token yet and the message does not end with the expected
    token, the head returns at once with ``api_token=None`` (unauthorized) and the payload is not
    scanned; a wrong token before ``data`` also returns at once. Compare the head's ``api_token``
    with the server's in constant time (``hmac.compare_digest``) either way.

    ``decoded_endpoints``: endpoints whose whole message the caller decodes with :func:`unpackb` anyway
    (and checks against this head: the same endpoint, an authorized token). When ``data`` is reached after
    such an endpoint (GR00T clients send ``endpoint`` first) and the token, if one is expected, is already
    known, the head returns there: the payload is not scanned twice.

    Raises :class:`ProtocolError` when the message is not a map with string keys of at most
    :data:`MAX_REQUEST_KEYS` entries, or ``endpoint`` is not a string. When a key repeats, the
    last one counts, as in :func:`unpackb`.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    longest = min(budget.max_values(size), size)
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(size, 1), max_str_len=size, max_bin_len=size, max_array_len=longest,
        max_map_len=longest, max_ext_len=size)
    endpoint: Any = "get_action"
    token: str | None = None
    has_data = False
    named = False  # whether an ``endpoint`` entry was read (before ``data``)
    fed = min(size, _PEEK_CHUNK)  # the head of a request is in its first bytes: feed the rest when needed

    def read(step: Callable[[], Any]) -> Any:
        nonlocal fed
        while True:
            try:
                return step()
            except msgpack.OutOfData:
                if fed == size:
                    raise
                unpacker.feed(view[fed:])
                fed = size

    try:
        unpacker.feed(view[:fed])
        try:
            entries = read(unpacker.read_map_header)
        except msgpack.UnpackValueError:
            raise ProtocolError("request must be a msgpack map") from None
        if entries > MAX_REQUEST_KEYS:
            raise ProtocolError(f"request map has {entries} entries; at most {MAX_REQUEST_KEYS} are accepted "
                                "(a GR00T request has 'endpoint', 'data' and 'api_token')")
        for index in range(entries):
            if unpacker.tell() >= size or view[unpacker.tell()] not in _STR_TYPES:
                raise ProtocolError("request map keys must be strings")
            key = read(unpacker.unpack)
            if key == "endpoint" or key == "api_token":
                kind = view[unpacker.tell()] if unpacker.tell() < size else None
                value = read(unpacker.unpack) if kind in _STR_TYPES else (read(unpacker.skip), _Unset)[1]
                if key == "endpoint":
                    if value is _Unset:
                        raise ProtocolError("request 'endpoint' must be a string")
                    endpoint, named = value, True
                else:
                    token = None if value is _Unset else value
                    if expected_token is not None and not _same(token, expected_token):
                        return RequestHead(endpoint, token, has_data)
            else:
                if key == "data":
                    has_data = True
                    if expected_token is not None and token is None and not _ends_with_token(view, expected_token):
                        return RequestHead(endpoint, None, True)
                    # Authenticated and nothing but the token follows: the payload is not scanned (the caller
                    # checks that the decoded message agrees with this head).
                    remaining = entries - index - 1
                    if expected_token is not None and remaining == (0 if token is not None else 1):
                        return RequestHead(endpoint, token if token is not None else expected_token, True)
                    if named and endpoint in decoded_endpoints and (expected_token is None or token is not None):
                        return RequestHead(endpoint, token, True)
                read(unpacker.skip)
    except ProtocolError:
        raise
    except msgpack.OutOfData:
        raise ProtocolError("could not decode msgpack message: truncated") from None
    except Exception as exc:  # noqa: BLE001 - hostile input must only ever raise ProtocolError
        if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            raise ProtocolError(f"message too complex: a {size}-byte message may hold containers of at most "
                                f"{longest} entries, this one has a larger one") from None
        raise ProtocolError(f"could not decode msgpack message ({type(exc).__name__}: {_clip(str(exc))})") from None
    if unpacker.tell() != size:
        raise ProtocolError(f"could not decode msgpack message: {size - unpacker.tell()} extra bytes after the message")
    return RequestHead(endpoint, token, has_data)


class _Unset:
    """Marks a value that was skipped, not read."""


def _same(token: str | None, expected: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode("utf-8", "replace"), expected.encode())


@functools.lru_cache(maxsize=8)
def _token_suffix(expected: str) -> bytes:
    return msgpack.packb("api_token") + msgpack.packb(expected)


def _ends_with_token(view: memoryview, expected: str) -> bool:
    """Whether the message ends with the entry ``"api_token": expected`` (compared in constant time)."""
    suffix = _token_suffix(expected)
    return len(view) >= len(suffix) and hmac.compare_digest(bytes(view[-len(suffix):]), suffix)
