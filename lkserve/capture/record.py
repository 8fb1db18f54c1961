"""What the engine captures at each verification step: the contract between engine, capture and trainer.

One record covers one request (or one chunk of a long request). For every *verified* drafted position — the
rejection sampler looked at it: all draft tokens up to and including the first rejected one — it keeps the target's
distribution as the sampler saw it (after temperature / top-p / top-k), reduced to its top-k tokens. Positions after
the first rejection are not kept: the target scored them after a prefix that never became part of the text.

`context_token_ids` is the prompt plus every token emitted up to the record's last position, so a trainer can rebuild
the draft's input without re-running the target: the target distribution at `positions[i]` predicts
`context_token_ids[positions[i]]` from `context_token_ids[:positions[i]]`.

Optional (EAGLE-3 deployments, format version 2): `hidden_states`, what an EAGLE-3 head consumes, the target's
auxiliary hidden states (the layers in the head's `eagle_aux_hidden_state_layer_ids`, concatenated: [Ph, n_aux * H])
at context positions hidden_start .. hidden_start + Ph - 1, stored as the raw 16-bit words of `hidden_dtype`
("bf16" or "fp16"; numpy has no bfloat16, so the array is uint16). `hidden_states_array(record)` gives float32.
Records without them are written in format version 1, which older readers still read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

RECORD_FORMAT_VERSION = 2  # 2 adds the optional hidden states; records without them are still written as 1
HIDDEN_DTYPES = ("bf16", "fp16")


@dataclass
class VerificationRecord:
    request_id: str
    model_id: str
    draft_version: str
    temperature: float
    context_token_ids: np.ndarray  # [C] uint32: prompt + emitted tokens
    positions: np.ndarray  # [P] uint32: index in context of the drafted token
    draft_index: np.ndarray  # [P] uint8: 0..K-1, place of the token inside its draft block
    draft_token_ids: np.ndarray  # [P] uint32: what the draft proposed
    accepted: np.ndarray  # [P] bool
    topk_ids: np.ndarray  # [P, k] uint32: target's top-k token ids at that position
    topk_probs: np.ndarray  # [P, k] float16: their probabilities (after temperature/top-p/top-k)
    residual: np.ndarray  # [P] float16: 1 - sum(topk_probs), mass the record does not name
    draft_probs: np.ndarray  # [P] float16: q(draft token); NaN when the draft's distribution was not kept
    top_p: float = 1.0
    top_k: int = -1  # the request's sampling top-k (-1 = off), not the capture's k
    timestamp: float = field(default_factory=time.time)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. {"domain": "code", "tenant": "acme"}
    hidden_states: np.ndarray | None = None  # [Ph, D] uint16: raw bf16/fp16 words of the target's aux hidden states
    hidden_start: int = 0  # context position of hidden_states[0]
    hidden_dtype: str = "bf16"

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])


def hidden_to_words(x, dtype: str = "bf16") -> np.ndarray:
    """A float tensor/array [.., D] -> uint16 words of bf16 (round to nearest even, as torch casts) or fp16."""
    import torch

    if dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {dtype!r}")
    t = torch.as_tensor(x).detach().to("cpu")
    t = t.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def words_to_float(words: np.ndarray, dtype: str = "bf16") -> np.ndarray:
    """Inverse of hidden_to_words, as float32."""
    if dtype == "fp16":
        return np.ascontiguousarray(words).view(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (np.ascontiguousarray(words).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {dtype!r}")


def hidden_states_array(record: VerificationRecord) -> np.ndarray | None:
    """The record's hidden states as float32 [Ph, D], or None."""
    if record.hidden_states is None:
        return None
    return words_to_float(record.hidden_states, record.hidden_dtype)


def record_to_wire(rec: VerificationRecord) -> dict:
    """A record as msgpack-safe plain data (what crosses vLLM's RPC boundary): arrays become {dtype, shape, data}."""
    d: dict = {}
    for k, v in rec.__dict__.items():
        if isinstance(v, np.ndarray):
            d[k] = {"dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()}
        else:
            d[k] = v
    return d


def record_from_wire(d: dict) -> VerificationRecord:
    kw = {}
    for k, v in d.items():
        if isinstance(v, dict) and "dtype" in v and "data" in v:
            kw[k] = np.frombuffer(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
        else:
            kw[k] = v
    return VerificationRecord(**kw)
