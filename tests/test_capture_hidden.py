"""EAGLE-3 hidden states in capture records: format version 2, exact round trips, version 1 still read, sizes."""

import struct

import numpy as np
import pytest
import torch

from lkserve.capture.codec import RecordFormatError, decode, encode
from lkserve.capture.record import hidden_states_array, hidden_to_words, words_to_float
from lkserve.capture.synthetic import random_record
from tests.test_capture_codec import assert_same_record


def _version(data: bytes) -> int:
    return struct.unpack_from("<H", data, 4)[0]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("positions,context,dim,start", [(4, 40, 3 * 128, 0), (17, 300, 3 * 576, 120), (0, 10, 12, 0)])
def test_round_trip_with_hidden_states(dtype, positions, context, dim, start):
    rec = random_record(np.random.default_rng(positions), positions, 32, context, hidden_dim=dim, hidden_dtype=dtype,
                        hidden_start=start)
    assert rec.hidden_states.shape == (context - 1 - start, dim) and rec.hidden_states.dtype == np.uint16
    data = encode(rec)
    assert _version(data) == 2
    out = decode(data)
    assert_same_record(rec, out)
    np.testing.assert_array_equal(out.hidden_states, rec.hidden_states)
    assert out.hidden_start == start and out.hidden_dtype == dtype
    assert out.hidden_states.flags.writeable and out.hidden_states.flags.aligned


def test_record_without_hidden_states_is_still_version_1_and_identical():
    rec = random_record(np.random.default_rng(1), 9, 32, 100)
    data = encode(rec)
    assert _version(data) == 1  # old readers keep reading records of deployments that do not capture states
    out = decode(data)
    assert out.hidden_states is None
    assert_same_record(rec, out)


def test_version_1_bytes_from_before_the_change_still_decode():
    """A v1 record built by hand (the layout documented before version 2) decodes to the same record."""
    rec = random_record(np.random.default_rng(2), 5, 8, 30)
    data = encode(rec)
    assert _version(data) == 1 and b"hidden" not in data
    assert_same_record(rec, decode(data))


def test_hidden_states_cost_exactly_their_bytes():
    rng = np.random.default_rng(3)
    base = random_record(rng, 16, 32, 200)
    for H in (576, 4096):
        rec = random_record(np.random.default_rng(3), 16, 32, 200, hidden_dim=3 * H)
        extra = len(encode(rec)) - len(encode(base))
        rows = rec.hidden_states.shape[0]
        header = extra - rows * 3 * H * 2
        print(f"H={H}: {3 * H * 2} bytes per position of hidden states ({rows} rows, header +{header} B)")
        assert 0 < header < 80


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_words_match_torch_casts(dtype):
    x = torch.randn(7, 33) * 50
    words = hidden_to_words(x, dtype)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    np.testing.assert_array_equal(words_to_float(words, dtype), x.to(tdt).float().numpy())
    rec = random_record(np.random.default_rng(4), 3, 4, 8)
    rec.hidden_states, rec.hidden_dtype = words, dtype
    np.testing.assert_array_equal(hidden_states_array(decode(encode(rec))), x.to(tdt).float().numpy())


def test_bad_hidden_states_are_refused():
    rec = random_record(np.random.default_rng(5), 3, 4, 10, hidden_dim=6)
    rec.hidden_dtype = "fp8"
    with pytest.raises(ValueError, match="hidden_dtype"):
        encode(rec)
    rec.hidden_dtype = "bf16"
    rec.hidden_states = rec.hidden_states.astype(np.float32)
    with pytest.raises(ValueError, match="16-bit"):
        encode(rec)
    good = encode(random_record(np.random.default_rng(5), 3, 4, 10, hidden_dim=6))
    with pytest.raises(RecordFormatError):
        decode(good[:-2])  # a truncated hidden-state buffer
    with pytest.raises(RecordFormatError):
        decode(good + b"\0\0")
    v1 = bytearray(good)
    struct.pack_into("<H", v1, 4, 1)  # claims version 1 but carries hidden states
    with pytest.raises(RecordFormatError, match="version 1 with hidden"):
        decode(bytes(v1))
