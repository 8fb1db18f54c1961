"""Per-request capture inside the engine's worker: verification steps in, VerificationRecords out to a sink.

No vLLM here: the engine's hooks (lkserve/engine/vllm/hooks.py) translate each step into a `VerifyStep` /
`HiddenStep` and each request into a `RequestInfo`; this module decides which requests are captured, keeps only the
verified positions (accepted drafts + the first rejected one), reduces the target distribution to its top-k,
cuts long requests into records of `max_positions_per_record` positions and, for EAGLE-3, keeps a window of the
target's hidden states by context position.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from lkserve.capture.record import VerificationRecord, hidden_to_words
from lkserve.capture.sampling import should_capture
from lkserve.config import CaptureSettings

logger = logging.getLogger("lkserve.engine")


@dataclass
class RequestInfo:
    """What capture needs of one engine request. Token lists are the engine's live ones (not copies)."""

    request_id: str  # the caller's id (what records carry)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    capture: bool = True  # False: the request opted out
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Context length = position of the next drafted token."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


Lookup = Callable[[str], "RequestInfo | None"]  # engine-internal request id -> its current state


@dataclass
class VerifyStep:
    """One rejection-sampling step. Flat rows: request i's drafts are rows sum(num_draft_tokens[:i]) + 0..n_i-1."""

    req_ids: Sequence[str]  # [B] engine-internal ids of the batch rows
    num_draft_tokens: Sequence[int]  # [B]
    sampled_token_ids: np.ndarray  # [B, K+1] int, -1 = rejected slot
    draft_token_ids: Any  # [N] torch int tensor
    target_logits: Any  # [N, V] torch tensor: the target's logits after temperature / top-p / top-k
    draft_probs: Any = None  # [N, V] torch tensor, None unless the draft samples probabilistically
    fallback_logits: bool = False  # target_logits were recomputed (the sampler hook did not fire)


@dataclass
class HiddenStep:
    """The target's aux hidden states of one forward (EAGLE-3): request i owns rows starts[i] .. starts[i]+counts[i]-1."""

    req_ids: Sequence[str]  # [B]
    starts: Sequence[int]  # [B] first row of each request
    counts: Sequence[int]  # [B] tokens computed for it (0: not scheduled)
    hidden: Sequence[Any]  # per aux layer, torch [T, H] (T >= rows used)
    positions: Any  # torch [T]: context position of each row


@dataclass
class Positions:
    """Verified positions of one request, one row each (the columns of a VerificationRecord)."""

    positions: np.ndarray  # [P] uint32
    draft_index: np.ndarray  # [P] uint8
    draft_token_ids: np.ndarray  # [P] uint32
    accepted: np.ndarray  # [P] bool
    topk_ids: np.ndarray  # [P, k] uint32
    topk_probs: np.ndarray  # [P, k] float16
    residual: np.ndarray  # [P] float16
    draft_probs: np.ndarray  # [P] float16, NaN when unknown

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __getitem__(self, s: slice) -> Positions:
        return Positions(**{f.name: getattr(self, f.name)[s] for f in fields(self)})

    @staticmethod
    def concat(parts: list[Positions]) -> Positions:
        if len(parts) == 1:
            return parts[0]
        return Positions(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Positions)})


class RequestAcc:
    """Positions of one request accumulated since its last record, and (EAGLE-3) its hidden-state window."""

    def __init__(self, internal_id: str, info: RequestInfo):
        self.internal_id = internal_id
        self.info = info  # refreshed at every step (vLLM re-creates a request's state after a preemption)
        self.parts: list[Positions] = []
        self.n = 0
        # the target's aux hidden states by context position (hid_base = position of row 0), as 16-bit words;
        # rows of rejected tokens are overwritten when the position is computed again
        self.hid: np.ndarray | None = None  # [rows, D] uint16
        self.hid_base = 0
        self.hid_valid: np.ndarray | None = None  # [rows] bool

    @property
    def request_id(self) -> str:
        return self.info.request_id

    def put_hidden(self, start: int, words: np.ndarray) -> None:
        """Rows for context positions start .. start + len(words) - 1 (later writes win)."""
        n, dim = words.shape
        lo = start - self.hid_base
        if lo < 0:  # positions already trimmed away
            words, n, lo = words[-lo:], n + lo, 0
            if n <= 0:
                return
        if self.hid is None or self.hid.shape[1] != dim:
            self.hid = np.zeros((max(64, 2 * (lo + n)), dim), dtype=np.uint16)
            self.hid_valid = np.zeros(self.hid.shape[0], dtype=bool)
        if lo + n > self.hid.shape[0]:
            cap = max(2 * self.hid.shape[0], lo + n)
            hid = np.zeros((cap, dim), dtype=np.uint16)
            hid[: self.hid.shape[0]] = self.hid
            valid = np.zeros(cap, dtype=bool)
            valid[: self.hid_valid.shape[0]] = self.hid_valid
            self.hid, self.hid_valid = hid, valid
        self.hid[lo: lo + n] = words
        self.hid_valid[lo: lo + n] = True

    def hidden_window(self, start: int, end: int) -> tuple[int, np.ndarray] | None:
        """(first position, rows) for the longest fully-known range [s, end) with s >= start (a prefix-cache hit
        leaves positions the target never computed for this request)."""
        if self.hid is None or end <= start:
            return None
        lo, hi = start - self.hid_base, end - self.hid_base
        lo = max(lo, 0)
        if hi > self.hid.shape[0] or hi <= lo:
            return None
        valid = self.hid_valid[lo:hi]
        if not valid[-1]:
            return None
        bad = np.nonzero(~valid)[0]
        if len(bad):
            lo += int(bad[-1]) + 1
        return self.hid_base + lo, self.hid[lo:hi].copy()

    def trim_hidden(self, keep_from: int) -> None:
        """Forget rows before context position keep_from."""
        if self.hid is None or keep_from <= self.hid_base:
            return
        cut = min(keep_from - self.hid_base, self.hid.shape[0])
        self.hid = self.hid[cut:].copy()
        self.hid_valid = self.hid_valid[cut:].copy()
        self.hid_base += cut


class CaptureState:
    """Per-worker capture: fed by the engine's hooks, emits VerificationRecords to `sink`.

    Every entry point that runs inside an engine step goes through `guarded`: capture must never break serving."""

    def __init__(self, settings: CaptureSettings, sink, *, model_id: str = "", seed: int = 0,
                 draft_version: str = "base"):
        self.settings = settings
        self.enabled = settings.enabled
        self.sample_rate = settings.sample_rate
        self.hidden = settings.hidden_states
        self.sink = sink
        self.model_id = model_id
        self.seed = seed
        self.draft_version = draft_version
        self.accs: dict[str, RequestAcc | None] = {}  # internal id -> accumulator, None = not captured
        self.pending_chunks: set[str] = set()  # requests holding a full record (flushed before the next step)
        self.stats = {"records": 0, "positions": 0, "dropped": 0, "errors": 0, "steps": 0,
                      "hook_seconds": 0.0, "fallback_logits": 0, "hidden_rows": 0, "hidden_unavailable": 0}
        self._warned = False

    def guarded(self, what: str, fn, *args) -> None:
        """Run a capture step inside the engine's step: its cost is timed, a failure is counted and logged once."""
        t0 = time.perf_counter()
        try:
            fn(*args)
        except Exception:
            self.stats["errors"] += 1
            if not self._warned:
                self._warned = True
                logger.exception("lkserve: %s failed (further errors are only counted)", what)
        self.stats["hook_seconds"] += time.perf_counter() - t0

    # -- decisions -------------------------------------------------------------------------------------------
    def sampled(self, request_id: str) -> bool:
        """Per-request decision, reproducible: a hash of (seed, request id) is the request's uniform draw."""
        u = zlib.crc32(f"{self.seed}:{request_id}".encode()) / 2**32
        return should_capture(self.sample_rate, rng=lambda: u)

    def acc_for(self, internal_id: str, lookup: Lookup) -> RequestAcc | None:
        """The request's accumulator; the capture decision is taken once, at its first verified step."""
        if internal_id in self.accs:
            return self.accs[internal_id]
        info = lookup(internal_id)
        acc = None
        if (info is not None and len(self.accs) < self.settings.max_tracked_requests and info.capture
                and self.sampled(info.request_id) and info.prompt_token_ids is not None):
            acc = RequestAcc(internal_id, info)
        self.accs[internal_id] = acc
        return acc

    def set_enabled(self, enabled: bool, sample_rate: float | None, lookup: Lookup | None) -> None:
        self.flush_all(lookup)
        self.accs.clear()  # decisions are taken again under the new rate
        self.enabled = bool(enabled)
        if sample_rate is not None:
            self.sample_rate = float(sample_rate)

    # -- the hot path ----------------------------------------------------------------------------------------
    def on_step(self, step: VerifyStep, lookup: Lookup) -> None:
        """Keep the verified positions of every captured request of one verification step."""
        rows = []  # (batch index, acc, start in the flat draft rows, n drafts)
        start = 0
        for i, n in enumerate(step.num_draft_tokens):
            if n:
                acc = self.acc_for(step.req_ids[i], lookup)
                if acc is not None:
                    rows.append((i, acc, start, n))
            start += n
        if not rows:
            return
        self.stats["steps"] += 1
        self.stats["fallback_logits"] += int(step.fallback_logits)
        # select the verified rows before the softmax/top-k: with a weak draft that is ~1 of K rows (the capture's
        # cost scales with what it keeps)
        keep, plan = [], []  # flat rows to process; (acc, verified, accepted) per captured request
        real = np.asarray(step.draft_token_ids.cpu()) >= 0  # [num drafts]; -1: the scheduler's placeholders
        for i, acc, s, n in rows:
            v = int((step.sampled_token_ids[i] != -1).sum())  # emitted: accepted drafts + recovered/bonus token
            drafted = int(np.argmin(real[s:s + n])) if not real[s:s + n].all() else n  # before the first -1
            if v == 0 or drafted == 0:
                continue
            ver = min(v, n, drafted)
            keep.extend(range(s, s + ver))
            plan.append((acc, ver, v - 1))
        if not keep:
            return
        dids, top_ids, top_vals, resid, qn = self._reduce(step, keep)

        lo = 0
        for acc, ver, a in plan:
            acc.info = lookup(acc.internal_id) or acc.info
            p0 = acc.info.num_tokens  # position of draft 0
            j = np.arange(ver)
            acc.parts.append(Positions(
                positions=(p0 + j).astype(np.uint32),
                draft_index=j.astype(np.uint8),
                draft_token_ids=dids[lo:lo + ver],
                accepted=j < a,
                topk_ids=top_ids[lo:lo + ver],
                topk_probs=top_vals[lo:lo + ver],
                residual=resid[lo:lo + ver],
                draft_probs=qn[lo:lo + ver] if qn is not None else np.full(ver, np.nan, dtype=np.float16),
            ))
            acc.n += ver
            if acc.n >= self.settings.max_positions_per_record:
                self.pending_chunks.add(acc.internal_id)
            lo += ver

    def _reduce(self, step: VerifyStep, keep: list[int]):
        """The kept flat rows as numpy: draft ids [R], target top-k ids/probs [R, k], residual [R], q(draft) [R]."""
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=step.target_logits.device)
        draft_ids = step.draft_token_ids[idx]
        with torch.no_grad():
            probs = torch.softmax(step.target_logits[idx].to(torch.float32), dim=-1)  # [R, V]
            k = min(self.settings.top_k, probs.shape[-1])
            top_vals, top_ids = probs.topk(k, dim=-1)  # [R, k]
            resid = (1.0 - top_vals.sum(dim=-1)).clamp_(min=0.0)  # [R]
            q = None
            if step.draft_probs is not None:
                q = step.draft_probs[idx].gather(1, draft_ids.to(torch.long).unsqueeze(1)).squeeze(1)  # [R]
        top_vals = top_vals.cpu().numpy().astype(np.float16)
        top_ids = top_ids.cpu().numpy().astype(np.uint32)
        resid = resid.cpu().numpy().astype(np.float16)
        dids = draft_ids.cpu().numpy().astype(np.uint32)
        qn = q.cpu().numpy().astype(np.float16) if q is not None else None
        return dids, top_ids, top_vals, resid, qn

    def on_hidden(self, step: HiddenStep, lookup: Lookup) -> None:
        """After the target's forward (EAGLE-3): store the aux hidden states of every token computed for a captured
        request, by position. `step.hidden` is in the order the drafter concatenates them."""
        import torch

        picks = []  # (acc, start row, n)
        for rid, a, n in zip(step.req_ids, step.starts, step.counts):
            if n:
                acc = self.acc_for(rid, lookup)
                if acc is not None:
                    picks.append((acc, int(a), int(n)))
        if not picks:
            return
        idx = torch.cat([torch.arange(a, a + n) for _, a, n in picks]).to(step.hidden[0].device)
        with torch.no_grad():
            rows = torch.cat([h[idx] for h in step.hidden], dim=-1)  # [R, n_aux * H]
            pos = step.positions[idx].cpu().numpy()
        words = hidden_to_words(rows, self.settings.hidden_dtype)
        at = 0
        for acc, _a, n in picks:
            acc.put_hidden(int(pos[at]), words[at: at + n])
            at += n
        self.stats["hidden_rows"] += int(idx.numel())

    # -- emission --------------------------------------------------------------------------------------------
    def flush(self, internal_id: str, everything: bool, lookup: Lookup | None = None) -> None:
        """Emit records for a request: full chunks only, or everything accumulated (finish, swap, disable)."""
        acc = self.accs.get(internal_id)
        if acc is None or acc.n == 0:
            return
        info = (lookup(internal_id) if lookup is not None else None) or acc.info
        tokens = np.asarray(list(info.prompt_token_ids) + list(info.output_token_ids), dtype=np.int64)
        cols = Positions.concat(acc.parts)
        total, m = acc.n, self.settings.max_positions_per_record
        emit_upto = total if everything else (total // m) * m
        for a in range(0, emit_upto, m):
            self._emit(acc, tokens, cols[a: min(a + m, emit_upto)])
        if self.hidden and emit_upto > 0:  # the next record needs at most hidden_context rows before its start
            acc.trim_hidden(int(cols.positions[emit_upto - 1]) - self.settings.hidden_context - 1)
        if emit_upto >= total:
            acc.parts, acc.n = [], 0
        else:
            acc.parts, acc.n = [cols[emit_upto:]], total - emit_upto

    def _emit(self, acc: RequestAcc, tokens: np.ndarray, chunk: Positions) -> None:
        last = int(chunk.positions[-1])
        if last >= len(tokens) or (tokens[: last + 1] < 0).any():
            self.stats["errors"] += 1  # context not known yet (should not happen without async scheduling)
            return
        hidden = {}
        if self.hidden:
            ctx = self.settings.hidden_context
            win = acc.hidden_window(max(0, int(chunk.positions[0]) - 1 - ctx), last - 1)
            if win is None:
                self.stats["hidden_unavailable"] += 1
            else:
                hidden = {"hidden_start": win[0], "hidden_states": win[1], "hidden_dtype": self.settings.hidden_dtype}
        info = acc.info
        rec = VerificationRecord(
            request_id=info.request_id, model_id=self.model_id, draft_version=self.draft_version,
            temperature=info.temperature, context_token_ids=tokens[: last + 1].astype(np.uint32),
            positions=chunk.positions, draft_index=chunk.draft_index, draft_token_ids=chunk.draft_token_ids,
            accepted=chunk.accepted, topk_ids=chunk.topk_ids, topk_probs=chunk.topk_probs, residual=chunk.residual,
            draft_probs=chunk.draft_probs, top_p=info.top_p, top_k=info.top_k, tags=dict(info.tags), **hidden)
        try:
            ok = self.sink.put(rec)
        except Exception:  # noqa: BLE001 - a sink must never break serving
            ok = False
            self.stats["errors"] += 1
        if ok:
            self.stats["records"] += 1
            self.stats["positions"] += len(chunk)
        else:
            self.stats["dropped"] += 1

    def flush_all(self, lookup: Lookup | None = None) -> None:
        for rid in list(self.accs):
            self.flush(rid, True, lookup)
        self.pending_chunks.clear()

    def before_step(self, finished_ids, lookup: Lookup) -> None:
        """Before the engine's next forward: close the requests it finished, emit full chunks."""
        for rid in finished_ids or ():
            if rid in self.accs:
                self.flush(rid, True, lookup)
                self.accs.pop(rid, None)
            self.pending_chunks.discard(rid)
        for rid in list(self.pending_chunks):
            self.flush(rid, False, lookup)
        self.pending_chunks.clear()

    def finish_external(self, request_ids, lookup: Lookup | None = None) -> None:
        """Close requests the caller saw finish (by their external ids) before the engine reports them."""
        done = set(request_ids)
        for rid, acc in list(self.accs.items()):
            if acc is not None and acc.request_id in done:
                self.flush(rid, True, lookup)
                self.accs[rid] = None  # finished: never tracked again (popped when the engine reports it)
                self.pending_chunks.discard(rid)

    def info(self) -> dict[str, Any]:
        d = dict(self.stats)
        d.update(enabled=self.enabled, sample_rate=self.sample_rate, draft_version=self.draft_version,
                 hidden_states=self.hidden, hidden_dtype=self.settings.hidden_dtype,
                 hidden_context=self.settings.hidden_context,
                 tracked=sum(1 for a in self.accs.values() if a is not None),
                 sink_dropped=int(getattr(self.sink, "dropped", 0)),
                 sink_written=int(getattr(self.sink, "written", 0)),
                 sink_dropped_by_reason=dict(getattr(self.sink, "dropped_by_reason", {}) or {}))
        return d
