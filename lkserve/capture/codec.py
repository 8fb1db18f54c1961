"""Binary format of a `VerificationRecord` on the wire: a small msgpack header, then raw little-endian buffers.

    b"LKVR" | u16 version | u32 header length | msgpack header | padding to 4 bytes | buffers

Why not msgpack all the way: the bulk of a record is the [P, k] top-k table, and raw numpy buffers cost exactly
their bytes and decode with `np.frombuffer`. Token ids and positions are stored with the fewest bytes (2, 3 or 4)
that hold the record's largest value: a 49k vocabulary fits in 2 bytes, a 128k one in 3. That is what keeps a
position under 200 bytes at k=32 (k * (id bytes + 2) for the table, ~11 bytes for the rest); decoding always gives
back the uint32 arrays of the contract. The version comes first so an old reader refuses a new record loudly
instead of misreading it.

Version 2 (optional EAGLE-3 hidden states) = version 1 plus a "hidden" entry in the header ({start, rows, dim,
dtype}) and the [rows, dim] 16-bit words appended after the version-1 buffers. A record without hidden states is
still written as version 1, so readers that only know version 1 keep reading them.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np

from lkserve.capture.record import HIDDEN_DTYPES, RECORD_FORMAT_VERSION, VerificationRecord

MAGIC = b"LKVR"
_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
SUPPORTED_VERSIONS = (1, RECORD_FORMAT_VERSION)
# Integer arrays that are narrowed to 2/3/4 bytes, in buffer order (after the float16 ones).
_UINT_FIELDS = ("context_token_ids", "positions", "draft_token_ids", "topk_ids")


class RecordFormatError(ValueError):
    """The bytes are not a record this lkserve can read (garbage, truncated, or an unknown version)."""


def encode(record: VerificationRecord) -> bytes:
    """Serialize a record; raises ValueError if its arrays disagree on shapes (a bug upstream)."""
    P, k = _check_shapes(record)
    widths, uint_blobs = [], []
    for name in _UINT_FIELDS:
        width, blob = _narrow(getattr(record, name))
        widths.append(width)
        uint_blobs.append(blob)
    hidden = _check_hidden(record)
    fields = {
        "request_id": record.request_id,
        "model_id": record.model_id,
        "draft_version": record.draft_version,
        "temperature": float(record.temperature),
        "top_p": float(record.top_p),
        "top_k": int(record.top_k),
        "timestamp": float(record.timestamp),
        "tags": {str(key): str(value) for key, value in record.tags.items()},
        "shape": [int(record.context_token_ids.shape[0]), P, k],
        "widths": widths,
    }
    version = 1
    if hidden is not None:
        version = RECORD_FORMAT_VERSION
        fields["hidden"] = {"start": int(record.hidden_start), "rows": int(hidden.shape[0]),
                            "dim": int(hidden.shape[1]), "dtype": record.hidden_dtype}
    header = msgpack.packb(fields)
    parts = [
        _PREFIX.pack(MAGIC, version, len(header)),
        header,
        b"\0" * (-(_PREFIX.size + len(header)) % 4),  # keeps the float16 buffers aligned for frombuffer
        # float16 first (aligned), then the narrowed ints, then bytes.
        np.ascontiguousarray(record.topk_probs, dtype="<f2").tobytes(),
        np.ascontiguousarray(record.residual, dtype="<f2").tobytes(),
        np.ascontiguousarray(record.draft_probs, dtype="<f2").tobytes(),
        *uint_blobs,
        np.ascontiguousarray(record.draft_index, dtype=np.uint8).tobytes(),
        np.packbits(np.asarray(record.accepted, dtype=bool)).tobytes(),
    ]
    if hidden is not None:
        parts.append(np.ascontiguousarray(hidden, dtype="<u2").tobytes())
    return b"".join(parts)


def decode(data: bytes) -> VerificationRecord:
    """Parse bytes from `encode`; raises RecordFormatError on anything else. Arrays are fresh and writable."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise RecordFormatError(f"{len(view)} bytes is too short for a capture record")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise RecordFormatError(f"not a capture record (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version not in SUPPORTED_VERSIONS:
        raise RecordFormatError(
            f"capture record format version {version} is not supported by this lkserve "
            f"(reads {list(SUPPORTED_VERSIONS)}); upgrade the reader"
        )
    try:  # from here on, any failure means corrupt bytes: one exception type for the reader to handle
        header = msgpack.unpackb(view[_PREFIX.size : _PREFIX.size + header_len])
        if version == 1 and "hidden" in header:
            raise RecordFormatError("corrupt capture record: version 1 with hidden states")
        return _decode_body(header, view, _PREFIX.size + header_len)
    except RecordFormatError:
        raise
    except Exception as exc:
        raise RecordFormatError(f"corrupt capture record: {exc!r}") from exc


def _decode_body(header: dict, view: memoryview, offset: int) -> VerificationRecord:
    C, P, k = (int(n) for n in header["shape"])
    widths = [int(w) for w in header["widths"]]
    if min(C, P, k) < 0 or len(widths) != len(_UINT_FIELDS) or any(w not in (2, 3, 4) for w in widths):
        raise RecordFormatError(f"corrupt capture record header: shape {[C, P, k]}, widths {widths}")
    offset += -offset % 4
    counts = (C, P, P, P * k)  # elements of each _UINT_FIELDS array
    expected = offset + 2 * (P * k + 2 * P) + sum(w * n for w, n in zip(widths, counts)) + P + (P + 7) // 8
    hid = header.get("hidden")
    if hid is not None:
        rows, dim = int(hid["rows"]), int(hid["dim"])
        if rows < 0 or dim < 0 or int(hid["start"]) < 0 or hid["dtype"] not in HIDDEN_DTYPES:
            raise RecordFormatError(f"corrupt capture record header: hidden {hid}")
        expected += 2 * rows * dim
    if len(view) != expected:
        raise RecordFormatError(f"capture record is {len(view)} bytes, its header implies {expected}")

    buf = bytearray(view[offset:])  # one copy, so every array below is writable and owns no foreign memory
    cursor = 0

    def take(count: int, itemsize: int) -> memoryview:
        nonlocal cursor
        chunk = memoryview(buf)[cursor : cursor + count * itemsize]
        cursor += count * itemsize
        return chunk

    topk_probs = np.frombuffer(take(P * k, 2), dtype="<f2").reshape(P, k)
    residual = np.frombuffer(take(P, 2), dtype="<f2")
    draft_probs = np.frombuffer(take(P, 2), dtype="<f2")
    context, positions, draft_tokens, topk_ids = (_widen(take(n, w), w, n) for w, n in zip(widths, counts))
    draft_index = np.frombuffer(take(P, 1), dtype=np.uint8)
    accepted = np.unpackbits(np.frombuffer(take((P + 7) // 8, 1), dtype=np.uint8), count=P).astype(bool)
    extra = {}
    if hid is not None:  # unaligned after the bit-packed flags: copy into a fresh aligned array
        words = np.frombuffer(take(rows * dim, 2), dtype="<u2").astype(np.uint16).reshape(rows, dim)
        extra = {"hidden_states": words, "hidden_start": int(hid["start"]), "hidden_dtype": str(hid["dtype"])}
    return VerificationRecord(
        request_id=str(header["request_id"]),
        model_id=str(header["model_id"]),
        draft_version=str(header["draft_version"]),
        temperature=float(header["temperature"]),
        context_token_ids=context,
        positions=positions,
        draft_index=draft_index,
        draft_token_ids=draft_tokens,
        accepted=accepted,
        topk_ids=topk_ids.reshape(P, k),
        topk_probs=topk_probs,
        residual=residual,
        draft_probs=draft_probs,
        top_p=float(header["top_p"]),
        top_k=int(header["top_k"]),
        timestamp=float(header["timestamp"]),
        tags=dict(header["tags"]),
        **extra,
    )


def _check_shapes(record: VerificationRecord) -> tuple[int, int]:
    """Returns (P, k). A record whose arrays disagree would decode into nonsense, so refuse it at the source."""
    P = record.num_positions
    if record.topk_ids.ndim != 2 or record.topk_ids.shape[0] != P:
        raise ValueError(f"topk_ids must be [P={P}, k], got {record.topk_ids.shape}")
    k = int(record.topk_ids.shape[1])
    if record.topk_probs.shape != (P, k):
        raise ValueError(f"topk_probs must be [{P}, {k}], got {record.topk_probs.shape}")
    for name in ("draft_index", "draft_token_ids", "accepted", "residual", "draft_probs"):
        if getattr(record, name).shape != (P,):
            raise ValueError(f"{name} must be [{P}], got {getattr(record, name).shape}")
    if record.context_token_ids.ndim != 1:
        raise ValueError(f"context_token_ids must be 1-D, got {record.context_token_ids.shape}")
    return P, k


def _check_hidden(record: VerificationRecord) -> np.ndarray | None:
    h = record.hidden_states
    if h is None:
        return None
    if record.hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {record.hidden_dtype!r}")
    if h.ndim != 2 or h.dtype.itemsize != 2 or h.dtype.kind not in "uif":
        raise ValueError(f"hidden_states must be [rows, dim] 16-bit words, got {h.dtype} {h.shape}")
    if int(record.hidden_start) < 0:
        raise ValueError(f"hidden_start must be >= 0, got {record.hidden_start}")
    return h.view(np.uint16) if h.dtype != np.uint16 else h


def _narrow(values: np.ndarray) -> tuple[int, bytes]:
    """Little-endian uint32 values in the fewest bytes (2, 3 or 4) that hold the largest one."""
    values = np.ascontiguousarray(values, dtype="<u4").ravel()
    top = int(values.max()) if values.size else 0
    width = 2 if top < 1 << 16 else 3 if top < 1 << 24 else 4
    if width == 2:
        return 2, values.astype("<u2").tobytes()
    if width == 3:
        return 3, values.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return 4, values.tobytes()


def _widen(blob: memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of `_narrow`: back to a (fresh, aligned) uint32 array."""
    raw = np.frombuffer(blob, dtype=np.uint8)
    if width == 3:
        padded = np.zeros((count, 4), dtype=np.uint8)
        padded[:, :3] = raw.reshape(count, 3)
        raw = padded.reshape(-1)
        width = 4
    return raw.view("<u2" if width == 2 else "<u4").astype(np.uint32)
