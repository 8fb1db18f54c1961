"""Writer and reader against a real redis-server: bounded memory, outages, consumer groups, poison entries."""

import time

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from lkserve.capture.codec import encode
from lkserve.capture.reader import StreamReader
from lkserve.capture.sink import MemorySink, make_sink
from lkserve.capture.synthetic import random_record
from lkserve.capture.writer import FIELD, RedisStreamWriter
from tests.test_capture_codec import assert_same_record

STREAM = "test:capture"
RNG = np.random.default_rng(0)
RECORDS = [random_record(RNG, 16, 32, 512, request_id=f"r{i}") for i in range(64)]
RECORD_BYTES = len(encode(RECORDS[0]))


def write(url, n, **kwargs):
    writer = RedisStreamWriter(url, stream=STREAM, **kwargs)
    for i in range(n):
        assert writer.put(RECORDS[i % len(RECORDS)])
    assert writer.flush(10)
    return writer


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_records_come_back_identical(redis_url):
    written_before = metric("lkserve_capture_records_written_total")
    writer = write(redis_url, 10)
    reader = StreamReader(redis_url, stream=STREAM, group="g", consumer="c")
    got = reader.read(count=100, block_ms=100)
    assert [record.request_id for _, record in got] == [f"r{i}" for i in range(10)]
    for (_, record), original in zip(got, RECORDS):
        assert_same_record(original, record)
    assert (writer.written, writer.dropped, writer.errors) == (10, 0, 0)
    assert metric("lkserve_capture_records_written_total") - written_before == 10
    writer.close()


def test_flood_keeps_stream_and_memory_bounded(redis_url, redis_client):
    cap = 300
    used_before = redis_client.info("memory")["used_memory"]
    writer = write(redis_url, 3000, maxlen=cap, queue_size=4000)
    length = redis_client.xlen(STREAM)
    # MAXLEN ~ trims whole radix-tree nodes: at most one node (100 entries, or 4 KiB) over the cap.
    assert cap <= length <= cap + 100
    stream_bytes = redis_client.memory_usage(STREAM, samples=0)
    assert stream_bytes < 1.15 * cap * RECORD_BYTES, (stream_bytes, cap * RECORD_BYTES)
    assert redis_client.info("memory")["used_memory"] - used_before < 1.5 * cap * RECORD_BYTES
    assert writer.written == 3000 and writer.dropped == 0
    writer.close()


def test_redis_out_of_memory_drops_oldest_and_keeps_writing(killable_redis):
    client = redis.Redis.from_url(killable_redis.url)
    client.config_set("maxmemory", 4 << 20)  # far below what maxlen=100k implies
    fits = (4 << 20) // RECORD_BYTES
    writer = write(killable_redis.url, 4 * fits, queue_size=5 * fits)
    assert writer.dropped_by_reason.get("redis_error", 0) > 0  # some XADDs were refused (OOM) ...
    assert writer.written > 2 * fits  # ... but the writer trimmed the oldest and carried on
    assert client.xlen(STREAM) < fits
    assert client.info("memory")["used_memory"] < (4 << 20) * 1.1
    writer.close()


DEAD_URL = "redis://127.0.0.1:1/0"  # nothing listens there: connections are refused at once


def test_full_queue_drops_instead_of_blocking():
    writer = RedisStreamWriter(DEAD_URL, stream=STREAM, queue_size=8, backoff_initial=30)
    dropped_before = metric("lkserve_capture_records_dropped_total", reason="queue_full")
    results = [writer.put(RECORDS[0]) for _ in range(100)]
    # the flusher takes at most one batch before backing off for 30 s; the rest waits in 8 slots, or is dropped
    assert results.count(False) >= 100 - 8 - 8
    assert writer.dropped_by_reason["queue_full"] == results.count(False)
    assert metric(
        "lkserve_capture_records_dropped_total", reason="queue_full"
    ) - dropped_before == results.count(False)
    writer.close(timeout=1)


def test_queue_is_bounded_in_bytes_too():
    writer = RedisStreamWriter(
        DEAD_URL, stream=STREAM, queue_size=10_000, max_queue_bytes=3 * RECORD_BYTES, backoff_initial=30
    )
    results = [writer.put(RECORDS[0]) for _ in range(100)]
    assert results.count(True) <= 6 and writer.dropped_by_reason["queue_full"] == results.count(False)
    writer.close(timeout=1)


def test_redis_killed_mid_stream(killable_redis):
    """Redis dies: put() neither raises nor blocks (p99 < 1 ms), drops are counted, writing resumes on restart."""
    url = killable_redis.url
    writer = RedisStreamWriter(url, stream=STREAM, queue_size=256, backoff_initial=0.02, backoff_max=0.2)
    for record in RECORDS[:50]:
        writer.put(record)
    assert writer.flush(5) and writer.written == 50

    killable_redis.kill()
    latencies = []
    for i in range(3000):
        start = time.perf_counter()
        writer.put(RECORDS[i % len(RECORDS)])
        latencies.append(time.perf_counter() - start)
        if i % 10 == 0:
            time.sleep(0.001)  # a few seconds of "traffic", so the flusher retries against the dead server
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 1e-3, f"put p99 {p99 * 1e3:.2f} ms while Redis is down"
    assert writer.written == 50
    assert writer.dropped > 0 and writer.errors > 0
    assert writer.dropped_by_reason.get("redis_error", 0) > 0

    killable_redis.start()  # same port, empty (no persistence)
    assert killable_redis.url == url
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while client.exists(STREAM) == 0 and time.monotonic() < deadline:
        writer.put(RECORDS[0])
        time.sleep(0.01)
    assert writer.flush(5)
    assert client.xlen(STREAM) > 0 and writer.written > 50
    writer.close()


def test_retention_trims_old_records_even_when_idle(redis_url, redis_client):
    writer = RedisStreamWriter(redis_url, stream=STREAM, retention_seconds=0.5)
    for record in RECORDS[:10]:
        writer.put(record)
    writer.flush(5)
    assert redis_client.xlen(STREAM) == 10
    time.sleep(1.6)  # older than the retention, and past the once-a-second trim interval; no traffic
    assert redis_client.xlen(STREAM) == 0
    for record in RECORDS[10:15]:
        writer.put(record)
    writer.flush(5)
    assert redis_client.xlen(STREAM) == 5  # fresh records are kept
    writer.close()


def test_close_writes_what_is_queued_and_refuses_more(redis_url, redis_client):
    writer = RedisStreamWriter(redis_url, stream=STREAM)
    for record in RECORDS[:40]:
        writer.put(record)
    writer.close()
    assert redis_client.xlen(STREAM) == 40
    assert writer.put(RECORDS[0]) is False and writer.dropped_by_reason["closed"] == 1


def test_invalid_record_is_dropped_and_counted(redis_url):
    writer = RedisStreamWriter(redis_url, stream=STREAM)
    bad = random_record(np.random.default_rng(1), 4, 8, 20)
    bad.accepted = bad.accepted[:2]
    assert writer.put(bad) is False
    assert writer.dropped_by_reason["invalid"] == 1 and writer.errors == 1
    writer.close()


def test_make_sink():
    assert isinstance(make_sink({"kind": "memory", "maxlen": 3}), MemorySink)
    with pytest.raises(ValueError, match="unknown capture sink"):
        make_sink({"kind": "kafka"})


def test_make_sink_redis_from_plain_dict(redis_url, redis_client):
    spec = {
        "kind": "redis",
        "url": redis_url,
        "stream": STREAM,
        "maxlen": 1000,
        "queue_size": 64,
        "retention_seconds": None,
    }
    sink = make_sink(spec)
    assert sink.put(RECORDS[0]) is True
    sink.close()
    assert redis_client.xlen(STREAM) == 1


# --- reader: consumer groups ---


def read_all(reader, count=16):
    got = []
    while batch := reader.read(count=count, block_ms=50):
        got += batch
    return got


def test_two_consumers_split_the_stream(redis_url):
    write(redis_url, 200).close()
    a = StreamReader(redis_url, stream=STREAM, group="g", consumer="a")
    b = StreamReader(redis_url, stream=STREAM, group="g", consumer="b")
    got_a, got_b = [], []
    while True:
        batch_a, batch_b = a.read(count=7, block_ms=50), b.read(count=7, block_ms=50)
        if not batch_a and not batch_b:
            break
        got_a += batch_a
        got_b += batch_b
    ids_a, ids_b = {i for i, _ in got_a}, {i for i, _ in got_b}
    assert got_a and got_b and not ids_a & ids_b
    assert len(ids_a | ids_b) == 200
    assert a.pending() == 200  # nothing is acked by reading
    assert a.ack(ids_a) == len(ids_a) and b.ack(ids_b) == len(ids_b)
    assert a.pending() == 0


def test_crashed_consumer_records_are_reclaimed_once(redis_url):
    write(redis_url, 50).close()
    dead = StreamReader(redis_url, stream=STREAM, group="g", consumer="dead", claim_min_idle_ms=300)
    taken = dead.read(count=30, block_ms=100)  # ... and the worker dies before acking
    assert len(taken) == 30
    alive = StreamReader(redis_url, stream=STREAM, group="g", consumer="alive", claim_min_idle_ms=300)
    first = read_all(alive)  # the 20 never delivered; the dead one's are not idle long enough yet
    assert len(first) == 20
    alive.ack(i for i, _ in first)
    time.sleep(0.35)
    reclaimed = read_all(alive)
    assert sorted(i for i, _ in reclaimed) == sorted(i for i, _ in taken)
    assert [r.request_id for _, r in sorted(reclaimed)] == [r.request_id for _, r in sorted(taken)]
    assert alive.ack(i for i, _ in reclaimed) == 30
    assert alive.pending() == 0
    # after the ack nobody sees them again, however long we wait
    time.sleep(0.35)
    assert read_all(alive) == [] and read_all(dead) == []
    assert dead.ack(i for i, _ in taken) == 0  # a late ack from the zombie is harmless


def test_undecodable_entry_does_not_wedge_the_group(redis_url, redis_client):
    good = encode(RECORDS[0])
    redis_client.xadd(STREAM, {FIELD: good})
    bad_id = redis_client.xadd(STREAM, {FIELD: b"not a record"})
    future = bytearray(good)
    future[4] = 7  # a format version from the future
    redis_client.xadd(STREAM, {FIELD: bytes(future)})
    redis_client.xadd(STREAM, {b"other": b"field"})
    redis_client.xadd(STREAM, {FIELD: good})
    reader = StreamReader(redis_url, stream=STREAM, group="g", consumer="c")
    got = read_all(reader)
    assert len(got) == 2 and reader.undecodable == 3
    dead = redis_client.xrange(f"{STREAM}:dead")
    assert len(dead) == 3 and dead[0][1][b"entry_id"] == bad_id
    assert reader.pending() == 2  # the bad ones are acked, the good ones wait for the caller
    reader.ack(i for i, _ in got)
    assert read_all(reader) == [] and reader.pending() == 0


def test_pending_records_trimmed_away_are_acked_and_counted(redis_url, redis_client):
    write(redis_url, 20).close()
    dead = StreamReader(redis_url, stream=STREAM, group="g", consumer="dead")
    assert len(dead.read(count=20)) == 20
    redis_client.xtrim(STREAM, maxlen=5, approximate=False)  # the writer's cap overtook the dead worker
    alive = StreamReader(redis_url, stream=STREAM, group="g", consumer="alive", claim_min_idle_ms=0)
    got = alive.read(count=20, block_ms=10)
    assert len(got) == 5 and alive.trimmed == 15
    alive.ack(i for i, _ in got)
    assert alive.pending() == 0


def test_reader_survives_stream_deletion(redis_url, redis_client):
    reader = StreamReader(redis_url, stream=STREAM, group="g", consumer="c")
    redis_client.delete(STREAM)  # group gone with it
    assert reader.read(count=5, block_ms=10) == []
    write(redis_url, 3).close()
    assert len(read_all(reader)) == 3
