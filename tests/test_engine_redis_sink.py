"""The serving path end to end: vLLM's verification step -> Redis sink (writer thread) -> stream -> consumer group.

The shared engine's capture is pointed at a real redis-server for this test, then back at its memory sink.
"""

import time

import numpy as np
import pytest

from lkserve.capture.reader import StreamReader
from lkserve.capture.sink import redis_sink_spec
from lkserve.config import CaptureSettings, RedisSettings
from tests.conftest import CAPTURE_TOP_K, CHUNK_POSITIONS, prompt_ids

pytestmark = pytest.mark.slow


CAPTURE = CaptureSettings(enabled=True, sample_rate=1.0, top_k=CAPTURE_TOP_K,
                          max_positions_per_record=CHUNK_POSITIONS, queue_size=100_000)


def test_engine_records_reach_redis_and_a_consumer_group(spec_engine, redis_url, redis_client):
    from vllm import SamplingParams

    engine = spec_engine.engine
    spec_engine.use_draft("random")
    spec_engine.drain()
    sink = redis_sink_spec(redis_url, RedisSettings(stream="e2e:capture", stream_maxlen=10_000),
                           CaptureSettings(queue_size=1000))
    spec_engine.run(engine.configure_capture(CAPTURE, sink))
    try:
        jobs = [(p, SamplingParams(temperature=1.0, max_tokens=60, seed=i, ignore_eos=True),
                 {"tags": {"domain": "e2e"}}) for i, p in enumerate(prompt_ids(spec_engine, 3))]
        results = spec_engine.generate_many(jobs)
        expected = sum(r.spec.verified_positions for r in results)
        reader = StreamReader(redis_url, stream="e2e:capture", group="g", consumer="c1")
        got, deadline = [], time.monotonic() + 30
        while sum(r.num_positions for _, r in got) < expected and time.monotonic() < deadline:
            got += reader.read(count=100, block_ms=200)
        by_request = {}
        for _, rec in got:
            by_request.setdefault(rec.request_id, []).append(rec)
        assert sorted(by_request) == sorted(r.request_id for r in results)
        for res in results:
            recs = by_request[res.request_id]
            assert sum(r.num_positions for r in recs) == res.spec.verified_positions
            assert int(sum(r.accepted.sum() for r in recs)) == res.spec.accepted
            assert all(r.tags == {"domain": "e2e"} and r.draft_version == "random" for r in recs)
            assert all(np.isfinite(r.topk_probs.astype(np.float32)).all() for r in recs)
        assert reader.pending() == len(got)  # nothing acknowledged before it is used
        reader.ack([eid for eid, _ in got])
        assert reader.pending() == 0
        reader.close()
        info = spec_engine.run(engine.info())
        assert info["capture"]["dropped"] == 0
    finally:
        spec_engine.run(engine.configure_capture(CAPTURE, {"kind": "memory", "maxlen": 100_000}))
