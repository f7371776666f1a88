"""Decode budgets and the pre-auth peek: hostile messages cost O(their size) at most, nothing before auth."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from policyserve.errors import ProtocolError
from policyserve.wire import gr00t, openpi
from policyserve.wire.gr00t import (
    ARRAY_COST, MAX_REQUEST_KEYS, DecodeBudget, DecodeStats, RequestHead, packb, peek_request, unpackb,
)

MB16 = 16 << 20


def tree(leaf: bytes, size: int = MB16, fan: int = 15) -> bytes:
    """A msgpack tree of ``fan``-wide arrays with ``leaf`` leaves, about ``size`` bytes (no container is large)."""
    node = leaf
    while len(node) * fan < size:
        node = bytes([0x90 | fan]) + node * fan
    count = size // len(node)
    return bytes([0x90 | count]) + node * count


def npy_array_bomb(codec: str, size: int = MB16) -> bytes:
    """Many empty arrays, each with a distinct header (defeats header caches), in a tree."""
    pack = gr00t.packb if codec == "gr00t" else openpi.packb
    leaves = [pack(np.zeros((0, i + 1), np.uint8)) for i in range(15 ** 3)]
    chunks = [bytes([0x9F]) + b"".join(leaves[i:i + 15]) for i in range(0, len(leaves), 15)]
    groups = [bytes([0x9F]) + b"".join(chunks[i:i + 15]) for i in range(0, len(chunks), 15)]
    unit = bytes([0x9F]) + b"".join(groups[:15])
    count = min(15, size // len(unit))
    return bytes([0x90 | count]) + unit * count


def huge_shape_bomb(size: int = MB16) -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"
    header += b" " * (118 - len(header)) + b"\n"
    one = packb({"__ndarray_class__": True, "as_npy": b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header})
    return tree(one, size)


BOMBS: dict[str, Callable[[], bytes]] = {
    "empty arrays": lambda: tree(b"\x90"),
    "empty maps": lambda: tree(b"\x80"),
    "one-key maps": lambda: tree(b"\x81\xa0\xc0", fan=5),
    "floats": lambda: tree(b"\xcb" + bytes(8)),
    "one-char strings": lambda: tree(b"\xa1x"),
    "nil": lambda: tree(b"\xc0"),
}


def measure(decode: Callable[[bytes], object], data: bytes) -> tuple[float, int, str]:
    """(seconds, tracemalloc peak bytes, outcome) of decoding ``data``."""
    start = time.perf_counter()
    try:
        decode(data)
        outcome = "decoded"
    except ProtocolError as exc:
        outcome = str(exc)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        decode(data)
    except ProtocolError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, outcome


@pytest.mark.parametrize("codec", ["gr00t", "openpi"])
@pytest.mark.parametrize("name", [*BOMBS, "tiny arrays", "huge shapes"])
def test_16mb_bombs_are_refused_fast_and_small(codec: str, name: str) -> None:
    if name == "tiny arrays":
        data = npy_array_bomb(codec)
    elif name == "huge shapes":
        if codec == "openpi":
            data = tree(openpi.packb(np.zeros(0, np.float32)).replace(b"\x91\x00", b"\x92\xce\xff\xff\xff\xff"
                                                                      b"\xce\xff\xff\xff\xff"))
        else:
            data = huge_shape_bomb()
    else:
        data = BOMBS[name]()
    decode = gr00t.unpackb if codec == "gr00t" else openpi.unpackb
    seconds, peak, outcome = measure(decode, data)
    # measured ~0.1-0.25 s and < 0.5x on a loaded 2-core machine; the bounds are the goals, with margin for load
    assert seconds < 2.0, f"{name}: {seconds:.2f} s"
    assert peak < 2 * len(data), f"{name}: peak {peak / 1e6:.1f} MB for {len(data) / 1e6:.1f} MB"
    assert outcome != "decoded", f"{name} decoded"
    assert "message too complex" in outcome or "needs" in outcome or "size mismatch" in outcome, outcome


def test_value_budget_is_exact_and_named() -> None:
    budget = DecodeBudget(base_values=10, bytes_per_value=1 << 30)
    assert unpackb(msgpack.packb(list(range(9))), budget=budget) == list(range(9))  # 9 ints + the array = 10
    with pytest.raises(ProtocolError, match=r"may decode to at most 10 values"):
        unpackb(msgpack.packb(list(range(10))), budget=budget)
    assert openpi.unpackb(msgpack.packb(list(range(9))), budget=budget) == list(range(9))
    with pytest.raises(ProtocolError, match=r"may decode to at most 10 values"):
        openpi.unpackb(msgpack.packb(list(range(10))), budget=budget)


def test_value_budget_grows_with_the_wire_size() -> None:
    budget = DecodeBudget(base_values=0, bytes_per_value=2)
    assert budget.max_values(100) == 50
    assert DecodeBudget().max_values(1 << 30) == DecodeBudget().max_values_cap  # a 1 GB message gets no more
    with pytest.raises(ProtocolError, match="at most 100 values"):
        unpackb(msgpack.packb([[None] * 100] * 10), budget=DecodeBudget(base_values=0, bytes_per_value=1,
                                                                        max_values_cap=100))
    message = msgpack.packb([None] * 200)  # 203 bytes, 201 values: more than one per 2 bytes
    with pytest.raises(ProtocolError, match="at most 101 values"):
        unpackb(message, budget=budget)
    assert len(unpackb(msgpack.packb(["x" * 30] * 10), budget=budget)) == 10


def test_arrays_count_as_array_cost_values() -> None:
    message = packb([np.zeros(3, np.float32)] * 4)
    stats = DecodeStats()
    unpackb(message, stats=stats)
    assert stats.values == 1 + 4 + 4 * (5 + ARRAY_COST)  # outer array, its items, each a 2-entry map + the array
    with pytest.raises(ProtocolError, match="at most"):
        unpackb(message, budget=DecodeBudget(base_values=stats.values - 1, bytes_per_value=1 << 30))


def test_decoded_bytes_budget_is_named_and_counts_array_data() -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    stats = DecodeStats()
    unpackb(bytearray(packb({"f": frame})), stats=stats)  # a writable buffer: the array is a view, not a copy
    assert stats.wire_bytes == len(packb({"f": frame})) and frame.nbytes <= stats.decoded_bytes < 2 * frame.nbytes
    unpackb(packb({"f": frame}), stats=stats)  # immutable bytes: a writable copy, counted too
    assert 2 * frame.nbytes <= stats.decoded_bytes < 3 * frame.nbytes
    with pytest.raises(ProtocolError, match=r"may decode to at most 1000 bytes"):
        unpackb(packb({"f": frame}), budget=DecodeBudget(base_bytes=1000, bytes_ratio=0))
    stats = DecodeStats()
    openpi.unpackb(openpi.packb({"f": frame}), stats=stats)
    assert frame.nbytes <= stats.decoded_bytes < 2 * frame.nbytes
    with pytest.raises(ProtocolError, match=r"may decode to at most 1000 bytes"):
        openpi.unpackb(openpi.packb({"f": frame}), budget=DecodeBudget(base_bytes=1000, bytes_ratio=0))


def test_a_large_legitimate_message_is_within_the_default_budget() -> None:
    frames = np.zeros((64, 1, 224, 224, 3), np.uint8)  # 9.6 MB of video, 64 language rows, state
    obs = {"video": {"ego": frames}, "state": {f"s{i}": np.zeros((64, 1, 7), np.float32) for i in range(20)},
           "language": {"task": [["pick up the red cube and put it in the bowl"]] * 64}}
    message = packb({"endpoint": "get_action", "data": {"observation": obs, "options": None}})
    start = time.perf_counter()
    decoded = unpackb(message)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(decoded["data"]["observation"]["video"]["ego"], frames)
    back = openpi.unpackb(openpi.packb(obs))
    assert back["language"]["task"][63] == ["pick up the red cube and put it in the bowl"]


def test_deadline_stops_decoding() -> None:
    message = msgpack.packb([[i] for i in range(10_000)])
    with pytest.raises(ProtocolError, match="deadline"):
        unpackb(message, deadline=time.monotonic() - 1)
    assert len(unpackb(message, deadline=time.monotonic() + 60)) == 10_000


def test_huge_claimed_shapes_do_not_wrap_around() -> None:
    # 2**32 * 2**32 elements wraps to 0 in int64: the size check must still refuse it
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"
    header += b" " * (118 - len(header)) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(ProtocolError, match="size mismatch"):
        unpackb(packb({"__ndarray_class__": True, "as_npy": npy}))
    too_many_dims = b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"1, " * 40 + b"), }"
    too_many_dims += b" " * (64 - (len(too_many_dims) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(too_many_dims).to_bytes(2, "little") + too_many_dims
    with pytest.raises(ProtocolError, match="at most 32"):
        unpackb(packb({"__ndarray_class__": True, "as_npy": npy}))


def test_client_text_in_errors_is_escaped_and_truncated() -> None:
    evil = "\x1b[31mFAKE LOG LINE\n" * 100
    header = ("{'descr': '" + evil + "', 'fortran_order': False, 'shape': (1,), }").encode("latin1")
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(ProtocolError) as info:
        unpackb(packb({"__ndarray_class__": True, "as_npy": npy}))
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 400
    with pytest.raises(ProtocolError) as info:
        openpi.unpackb(msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": evil, b"shape": [0]}))
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and len(str(info.value)) < 400


# -- peek_request ------------------------------------------------------------------------------------

def test_peek_reads_endpoint_token_and_data_presence() -> None:
    obs = {"state": {"j": np.zeros((1, 1, 7), np.float32)}}
    assert peek_request(packb({"endpoint": "get_action", "data": {"observation": obs}, "api_token": "t"})) == \
        RequestHead("get_action", "t", True)
    assert peek_request(packb({"endpoint": "ping"})) == RequestHead("ping", None, False)
    assert peek_request(packb({})) == RequestHead("get_action", None, False)  # GR00T's default endpoint
    assert peek_request(packb({"api_token": 5, "endpoint": "reset"})) == RequestHead("reset", None, False)
    # a repeated key: the last one counts, as in unpackb
    repeated = b"\x82" + packb("endpoint") + packb("kill") + packb("endpoint") + packb("ping")
    assert peek_request(repeated).endpoint == unpackb(repeated)["endpoint"] == "ping"


@pytest.mark.parametrize("message, error", [
    (packb([1, 2]), "must be a msgpack map"),
    (b"\x81\x01\xc0", "keys must be strings"),
    (packb({"endpoint": 3}), "'endpoint' must be a string"),
    (packb({f"k{i}": None for i in range(MAX_REQUEST_KEYS + 1)}), f"at most {MAX_REQUEST_KEYS}"),
    (packb({"endpoint": "ping"})[:-2], "truncated"),
    (packb({"endpoint": "ping"}) + b"\x00", "extra bytes"),
    (b"\x81\xa4data\xc1", "could not decode"),
    (b"", "truncated"),
])
def test_peek_refuses_malformed_requests(message: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        peek_request(message)


def test_peek_leaves_the_payload_of_an_endpoint_the_caller_decodes_unscanned() -> None:
    """With ``decoded_endpoints`` the head returns at ``data`` once the endpoint (and an expected token) is
    known: the caller's full decode reads the payload once, not twice. A truncated payload shows it."""
    cut = packb({"endpoint": "get_action", "data": {"observation": {"a": np.ones(300)}}})[:-100]
    with pytest.raises(ProtocolError, match="truncated"):
        peek_request(cut)
    assert peek_request(cut, decoded_endpoints={"get_action"}) == RequestHead("get_action", None, True)
    with pytest.raises(ProtocolError, match="truncated"):  # an endpoint that is not decoded: scanned
        peek_request(cut, decoded_endpoints={"reset"})
    late = packb({"data": {"x": np.ones(300)}, "endpoint": "reset"})[:-10]  # endpoint after data: scanned
    with pytest.raises(ProtocolError, match="truncated"):
        peek_request(late, decoded_endpoints={"get_action", "reset"})
    token_last = packb({"endpoint": "get_action", "data": {"x": np.ones(300)}, "other": 1, "api_token": "t"})
    assert peek_request(token_last[:-20], decoded_endpoints={"get_action"}, expected_token="t").api_token is None
    token_first = packb({"api_token": "t", "endpoint": "get_action", "data": {"x": np.ones(300)}, "other": 1})
    assert peek_request(token_first[:-20], decoded_endpoints={"get_action"}, expected_token="t") == \
        RequestHead("get_action", "t", True)


def _bomb_request(token: str) -> bytes:
    return (b"\x83" + packb("endpoint") + packb("get_action") + packb("data") + tree(b"\x90")
            + packb("api_token") + packb(token))


def test_peek_refuses_an_unauthenticated_16mb_bomb_in_o1() -> None:
    message = _bomb_request("wrong")
    tracemalloc.start()
    start = time.perf_counter()
    head = peek_request(message, expected_token="secret")
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert head.api_token is None and head.endpoint == "get_action"
    assert seconds < 0.05 and peak < 4 << 20, (seconds, peak)  # measured ~0.2 ms, 1 MB (msgpack's fixed buffer)
    # a wrong token sent before the payload is refused as early
    early = b"\x83" + packb("api_token") + packb("wrong") + packb("data") + tree(b"\x90") + packb("endpoint") + \
        packb("ping")
    start = time.perf_counter()
    assert peek_request(early, expected_token="secret").api_token == "wrong"
    assert time.perf_counter() - start < 0.05


def test_peek_with_the_right_token_reads_the_whole_head() -> None:
    message = _bomb_request("secret")
    start = time.perf_counter()
    assert peek_request(message, expected_token="secret") == RequestHead("get_action", "secret", True)
    assert time.perf_counter() - start < 2.0  # the payload is skipped by msgpack's C scanner (~80 ms measured)
    ordered = packb({"api_token": "secret", "data": {"x": 1}, "endpoint": "reset"})
    assert peek_request(ordered, expected_token="secret") == RequestHead("reset", "secret", True)


@pytest.mark.parametrize("request_map", [
    {"endpoint": "get_action", "data": {"observation": {"a": np.ones(3)}, "options": None}, "api_token": "tok"},
    {"endpoint": "ping", "api_token": "tok"},
    {"data": {"options": {"episode_index": 2}}, "endpoint": "reset"},
    {"endpoint": "kill"},
])
def test_peek_agrees_with_full_decoding(request_map: dict) -> None:
    message = packb(request_map)
    decoded = unpackb(message)
    head = peek_request(message)
    assert head == RequestHead(decoded.get("endpoint", "get_action"), decoded.get("api_token"), "data" in decoded)
    assert peek_request(message, expected_token="tok").api_token == decoded.get("api_token")


def test_one_oversized_container_is_refused_before_it_is_built() -> None:
    budget = DecodeBudget(base_values=100, bytes_per_value=1 << 30)
    flat = msgpack.packb([None] * 1000)
    for decode in (lambda m: unpackb(m, budget=budget), lambda m: openpi.unpackb(m, budget=budget)):
        with pytest.raises(ProtocolError, match="message too complex"):
            decode(flat)
    # peek_request skips the payload without building it (msgpack's skip applies no container limits)
    assert peek_request(packb({"endpoint": "get_action", "data": [None] * 1000}), budget=budget).has_data


def test_peek_does_not_scan_the_payload_of_an_authenticated_request():
    """With the token as the last entry, the payload is never walked: even bytes that are not msgpack pass the
    peek (the full decode, which the door runs next, refuses them)."""
    garbage = b"\xc1" * 4096  # 0xc1 is never valid msgpack
    body = (b"\x83" + msgpack.packb("endpoint") + msgpack.packb("get_action") + msgpack.packb("data") + garbage
            + msgpack.packb("api_token") + msgpack.packb("tok"))
    head = peek_request(body, expected_token="tok")
    assert (head.endpoint, head.api_token, head.has_data) == ("get_action", "tok", True)
    with pytest.raises(ProtocolError):
        unpackb(body)
