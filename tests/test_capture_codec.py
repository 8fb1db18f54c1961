"""The record format: exact round trips for every shape, loud refusal of anything else, and its size."""

import struct

import numpy as np
import pytest

from lkserve.capture.codec import RecordFormatError, decode, encode
from lkserve.capture.record import VerificationRecord
from lkserve.capture.synthetic import random_record

ARRAYS = [
    "context_token_ids",
    "positions",
    "draft_index",
    "draft_token_ids",
    "accepted",
    "topk_ids",
    "topk_probs",
    "residual",
    "draft_probs",
]
SCALARS = ["request_id", "model_id", "draft_version", "temperature", "top_p", "top_k", "timestamp", "tags"]


def assert_same_record(a: VerificationRecord, b: VerificationRecord) -> None:
    for name in SCALARS:
        assert getattr(a, name) == getattr(b, name), name
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == x.dtype and y.shape == x.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        if x.dtype == np.float16:  # bit-exact, so NaN == NaN
            np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16), err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize(
    "positions,k,context,vocab",
    [
        (0, 32, 40, 49_152),  # empty draft
        (1, 1, 10, 49_152),
        (4, 32, 100, 49_152),  # one draft block of K=4
        (17, 64, 512, 49_152),  # k=64, P not a multiple of 8 (bit-packed accepted)
        (512, 32, 30_000, 49_152),  # long context, max chunk
        (9, 32, 300, 128_256),  # Llama-3 vocab: 3-byte ids
        (9, 8, 300, 1 << 32),  # ids up to 2^32 - 1: 4-byte ids
    ],
)
def test_round_trip_every_shape(positions, k, context, vocab):
    record = random_record(np.random.default_rng(positions + k), positions, k, context, vocab_size=vocab)
    assert_same_record(record, decode(encode(record)))


def test_round_trip_tags_nan_and_unicode():
    record = random_record(np.random.default_rng(1), 12, 32, 64, tags={"domain": "code", "tenant": "äcme ✓"})
    record.draft_probs[::2] = np.nan
    record.request_id = "req-é-1"
    record.top_k = 50
    out = decode(encode(record))
    assert_same_record(record, out)
    assert np.isnan(out.draft_probs[::2]).all() and not np.isnan(out.draft_probs[1::2]).any()


def test_decoded_arrays_are_writable_copies():
    data = encode(random_record(np.random.default_rng(2), 5, 4, 20))
    out = decode(data)
    for name in ARRAYS:
        assert getattr(out, name).flags.writeable, name
    out.topk_probs[:] = 0  # must not touch the bytes
    assert_same_record(decode(data), decode(data))
    assert decode(data).topk_probs.any()


def test_unknown_version_is_refused_clearly():
    data = bytearray(encode(random_record(np.random.default_rng(3), 3, 4, 10)))
    struct.pack_into("<H", data, 4, 99)
    with pytest.raises(RecordFormatError, match="version 99 is not supported"):
        decode(bytes(data))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"",
        lambda d: b"garbage that is long enough",
        lambda d: d[:-1],  # truncated
        lambda d: d + b"\0",  # trailing bytes
        lambda d: d[:10] + b"\xc1" * 20 + d[30:],  # corrupt header
    ],
)
def test_garbage_is_refused(mutate):
    data = encode(random_record(np.random.default_rng(4), 3, 4, 10))
    with pytest.raises(RecordFormatError):
        decode(mutate(data))


def test_inconsistent_shapes_are_refused_at_encode():
    record = random_record(np.random.default_rng(5), 4, 8, 20)
    record.residual = record.residual[:3]
    with pytest.raises(ValueError, match="residual"):
        encode(record)


def size(positions, k=32, context=0, vocab=49_152):
    return len(encode(random_record(np.random.default_rng(6), positions, k, context, vocab_size=vocab)))


@pytest.mark.parametrize("vocab", [49_152, 128_256])
def test_bytes_per_position_under_200_at_k32(vocab):
    per_position = (size(256, vocab=vocab, context=300) - size(0, vocab=vocab, context=300)) / 256
    print(f"vocab {vocab}: {per_position:.1f} bytes per position at k=32")
    assert per_position < 200
    # top-k table k * (id + float16), draft token (id), position (2 bytes here), draft_index (1),
    # residual + draft_prob (2 float16), accepted (1 bit)
    id_bytes = 2 if vocab <= 1 << 16 else 3
    assert per_position == 32 * (id_bytes + 2) + id_bytes + 2 + 1 + 4 + 1 / 8


def test_context_costs_two_bytes_per_token_for_a_small_vocab():
    per_token = (size(4, context=4096) - size(4, context=2048)) / 2048
    assert per_token == 2


def test_corrupted_bytes_raise_only_record_format_error():
    """The reader dead-letters RecordFormatError; any other exception would wedge its consumer group."""
    rng = np.random.default_rng(7)
    data = encode(random_record(rng, 6, 4, 30, tags={"a": "b"}))
    for _ in range(3000):
        corrupt = bytearray(data)
        for i in rng.integers(4, 90, size=int(rng.integers(1, 4))):  # the prefix and msgpack header
            corrupt[i] = int(rng.integers(256))
        try:
            decode(bytes(corrupt))
        except RecordFormatError:
            pass
