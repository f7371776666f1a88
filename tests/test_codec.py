"""Wire codec: byte-for-byte compatibility with GR00T and robustness against hostile input."""

from __future__ import annotations

import io
import pickle

import msgpack
import numpy as np
import pytest

from policyserve import ActionConfig, ModalityConfig
from policyserve.errors import ProtocolError
from policyserve.wire.gr00t import encode_ndarray, packb, unpackb

from upstream_gr00t import from_bytes, to_bytes


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _s(text: str) -> bytes:
    """msgpack fixstr: 0xa0 | len, then the UTF-8 bytes."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def test_request_bytes_match_the_reference_sequence():
    # gr00t-protocol.md §1.2: the 239-byte request carrying state={"j": arange(6).reshape(1,2,3)}.
    arr = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    npy = _npy(arr)
    assert len(npy) == 152
    expected = (
        b"\x82" + _s("endpoint") + _s("get_action") + _s("data")
        + b"\x82" + _s("observation") + b"\x81" + _s("state") + b"\x81" + _s("j")
        + b"\x82" + b"\xb1__ndarray_class__" + b"\xc3" + _s("as_npy") + b"\xc4\x98" + npy
        + _s("options") + b"\xc0"
    )
    assert len(expected) == 239
    request = {"endpoint": "get_action", "data": {"observation": {"state": {"j": arr}}, "options": None}}
    assert packb(request) == expected
    decoded = unpackb(expected)
    got = decoded["data"]["observation"]["state"]["j"]
    assert got.dtype == np.float32 and got.shape == (1, 2, 3)
    np.testing.assert_array_equal(got, arr)
    assert decoded["data"]["options"] is None


def test_reply_bytes_match_upstream_encoder_both_ways():
    action = {"arm": np.linspace(0, 1, 2 * 16 * 6, dtype=np.float32).reshape(2, 16, 6)}
    reply = [action, {"note": "x", "n": 3}]
    ours = packb(reply)
    assert ours == to_bytes(reply)
    theirs = from_bytes(ours)
    np.testing.assert_array_equal(theirs[0]["arm"], action["arm"])
    back = unpackb(to_bytes(reply))
    np.testing.assert_array_equal(back[0]["arm"], action["arm"])
    assert back[1] == {"note": "x", "n": 3}


@pytest.mark.parametrize("arr", [
    np.zeros((1, 1, 224, 224, 3), np.uint8),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(12.0).reshape(3, 4)[:, ::2],
    np.array(["ab", "c"]),
    np.array(3.5),
    np.zeros((0, 3), np.float32),
    np.arange(5, dtype=">i4"),
    np.array([True, False]),
])
def test_ndarray_encoding_is_np_save_output(arr):
    assert encode_ndarray(arr) == _npy(arr)
    back = unpackb(packb({"a": arr}))["a"]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable


def test_modality_config_encoding_matches_upstream_map():
    config = ModalityConfig(
        delta_indices=[0, 1], modality_keys=["left_arm"],
        action_configs=[ActionConfig(rep="RELATIVE", type="NON_EEF", format="DEFAULT", state_key="left_arm")],
    )
    expected = msgpack.packb({"__ModalityConfig_class__": True, "as_json": {
        "delta_indices": [0, 1], "modality_keys": ["left_arm"], "sin_cos_embedding_keys": None,
        "mean_std_embedding_keys": None,
        "action_configs": [{"rep": "RELATIVE", "type": "NON_EEF", "format": "DEFAULT", "state_key": "left_arm"}],
    }})
    assert packb(config) == expected
    assert unpackb(expected) == config


def test_modality_config_legacy_variants_decode():
    as_string = msgpack.packb({"__ModalityConfig_class__": True,
                               "as_json": '{"delta_indices": [0], "modality_keys": ["a"]}'})
    as_dict = msgpack.packb({"__ModalityConfig_class__": True,
                             "as_dict": {"delta_indices": [0], "modality_keys": ["a"]}})
    assert unpackb(as_string) == unpackb(as_dict) == ModalityConfig([0], ["a"])


def test_numpy_scalars_and_tuples_round_trip():
    msg = {"f": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True), "t": (1, 2), "s": {3}}
    assert unpackb(packb(msg)) == {"f": 1.5, "i": 7, "b": True, "t": [1, 2], "s": [3]}


def test_read_only_view_decoding_avoids_copies():
    arr = np.arange(4096, dtype=np.uint8)
    view = unpackb(packb(arr), writable=False)
    assert not view.flags.writeable and not view.flags.owndata
    np.testing.assert_array_equal(view, arr)
    copied = unpackb(packb(arr))  # bytes are immutable: writable=True must copy
    assert copied.flags.writeable
    np.testing.assert_array_equal(copied, arr)


def test_writable_buffer_decodes_to_writable_views_without_copies():
    frames = np.zeros((2, 1, 64, 64, 3), dtype=np.uint8)
    message = bytearray(packb({"video": {"cam": frames}}))
    decoded = unpackb(message)["video"]["cam"]
    assert decoded.flags.writeable and decoded.shape == frames.shape
    decoded[0, 0, 0, 0, 0] = 7  # in place, as a normalising policy does: it writes into the message buffer
    assert 7 in message


def test_unaligned_float_arrays_are_copied_to_aligned_memory():
    arr = np.arange(4096, dtype=np.float32)  # its data lands at an odd offset in the message
    decoded = unpackb(bytearray(packb(arr)))
    assert decoded.flags.aligned and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, arr)


@pytest.mark.parametrize("payload", [
    msgpack.packb({1: "a"}),
    msgpack.packb({"data": {2.5: 1}}),
    msgpack.packb({b"raw": 1}, use_bin_type=True),
    msgpack.packb({(1, 2): 1}),
])
def test_maps_with_non_string_keys_are_refused(payload):
    with pytest.raises(ProtocolError, match="map keys must be strings"):
        unpackb(payload)


def test_extension_types_and_trailing_bytes_are_refused():
    with pytest.raises(ProtocolError, match="extension types"):
        unpackb(msgpack.packb(msgpack.ExtType(5, b"xx")))
    with pytest.raises(ProtocolError, match="extra bytes"):
        unpackb(packb({"a": 1}) + b"\x00")


@pytest.mark.parametrize("payload, message", [
    (b"\xff\x00garbage", "could not decode"),
    (packb({"a": np.zeros(100)})[:-7], "could not decode"),
    (msgpack.packb({"__ndarray_class__": True, "as_npy": _npy(np.array([{"x": 1}], dtype=object), True)}),
     "object-dtype"),
    (msgpack.packb({"__ndarray_class__": True, "as_npy": pickle.dumps(np.zeros(3))}), "NPY format"),
    (msgpack.packb({"__ndarray_class__": True, "as_npy": "not bytes"}), "must be bytes"),
    (msgpack.packb({"__ndarray_class__": True}), "must be bytes"),
    (msgpack.packb({"__ndarray_class__": True, "as_npy": _npy(np.zeros(4))[:-8]}), "size mismatch"),
    (msgpack.packb({"__ndarray_class__": True,
                    "as_npy": _npy(np.zeros(1)).replace(b"(1,)", b"(10**12,)"[:4])}), "NPY"),
    (msgpack.packb({"__ModalityConfig_class__": True, "as_json": {"nope": 1}}), "ModalityConfig"),
])
def test_hostile_payloads_raise_protocol_error(payload, message):
    with pytest.raises(ProtocolError, match=message):
        unpackb(payload)


def test_huge_declared_shape_is_refused_without_allocating():
    npy = bytearray(_npy(np.zeros(2, dtype=np.float64)))
    header_end = npy.index(b"\n")
    header = npy[10:header_end].decode().replace("(2,)", "(4000000000000,)")
    header = header.ljust(header_end - 10)
    npy[10:header_end] = header.encode()[: header_end - 10]
    with pytest.raises(ProtocolError, match="size mismatch"):
        unpackb(msgpack.packb({"__ndarray_class__": True, "as_npy": bytes(npy)}))


def test_deeply_nested_message_is_a_protocol_error():
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError):
        unpackb(deep)


def test_size_limit_refuses_before_decoding():
    with pytest.raises(ProtocolError, match="exceeds the maximum message size"):
        unpackb(packb({"a": np.zeros(1000)}), max_size=100)


def test_object_arrays_cannot_be_encoded():
    with pytest.raises(TypeError, match="object-dtype"):
        packb({"a": np.array([object()], dtype=object)})


# -- property-based: any nested observation round-trips exactly; any bytes fail only as ProtocolError ----
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_DTYPES = st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, ">i4", "<U3"])
_ARRAYS = _DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
_LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20) | _ARRAYS)
_MESSAGES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def _assert_same(got, want) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    else:
        assert type(got) is type(want) and got == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_MESSAGES)
def test_any_nested_message_round_trips_exactly(message):
    encoded = packb(message)
    _assert_same(unpackb(encoded), message)
    _assert_same(unpackb(bytearray(encoded)), message)  # writable buffer: views instead of copies
    if not isinstance(message, np.ndarray):
        assert encoded == to_bytes(message)  # byte for byte what GR00T's encoder writes


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
                    | st.text(max_size=10) | st.binary(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=15))
def test_decoder_agrees_with_msgpack_on_plain_messages(message):
    encoded = msgpack.packb(message, use_bin_type=True)
    assert unpackb(encoded) == msgpack.unpackb(encoded, raw=False)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        unpackb(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(_MESSAGES, st.data())
def test_corrupted_messages_raise_only_protocol_error(message, data):
    encoded = bytearray(packb(message))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    try:
        unpackb(bytes(encoded[:cut]))
    except ProtocolError:
        pass


@pytest.mark.parametrize("arr", [
    np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),  # structured: np.save writes a list descr
    np.zeros((2, 3), dtype="<M8[ms]"),
    np.zeros((), dtype="<c16"),
])
def test_non_canonical_npy_headers_take_the_general_parser(arr):
    back = unpackb(packb({"a": arr}))["a"]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_npy_header_with_unusual_spacing_still_decodes():
    header = b"{'descr':'<f4','fortran_order':False,'shape':(2,)}"
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + np.arange(2, dtype="<f4").tobytes()
    np.testing.assert_array_equal(unpackb(packb({"__ndarray_class__": True, "as_npy": npy})), [0.0, 1.0])
