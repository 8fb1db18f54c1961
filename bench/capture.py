"""Capture path throughput and size: how many records/s one writer gets into a local Redis, and what they cost.

Prints ONE JSON line. Records: k=32 top-k, 16 positions, 512-token context (SmolLM2's 49k vocabulary), into an
embedded redis-server on loopback. Usage: python bench/capture.py [--records N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import redis

from lkserve.capture.codec import decode, encode
from lkserve.capture.embedded_redis import EmbeddedRedis
from lkserve.capture.reader import StreamReader
from lkserve.capture.synthetic import random_record
from lkserve.capture.writer import RedisStreamWriter


def encoded_size(positions: int, context: int, vocab: int = 49_152, k: int = 32) -> int:
    return len(encode(random_record(np.random.default_rng(0), positions, k, context, vocab_size=vocab)))


def per_call_us(fn, arg, n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(arg)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    records = [random_record(rng, args.positions, args.k, args.context) for _ in range(64)]
    record_bytes = len(encode(records[0]))
    stream, cap = "bench:capture", 100_000

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp) as server:
        client = redis.Redis.from_url(server.url)
        writer = RedisStreamWriter(server.url, stream=stream, maxlen=cap, queue_size=4096)
        # Closed loop: when the queue is full the producer waits 1 ms and offers the same record again, so the
        # rate measured is what the flusher sustains (a full-queue put costs ~2 us and is counted as a drop).
        put_s, refused = [], 0
        start = time.perf_counter()
        for i in range(args.records):
            while True:
                t = time.perf_counter()
                accepted = writer.put(records[i % len(records)])
                put_s.append(time.perf_counter() - t)
                if accepted:
                    break
                refused += 1
                time.sleep(0.001)
        writer.flush(120)
        elapsed = time.perf_counter() - start
        writer.close()
        length = client.xlen(stream)
        stream_memory = client.memory_usage(stream, samples=0)

        reader = StreamReader(server.url, stream=stream, group="bench", consumer="c")
        start, read = time.perf_counter(), 0
        while batch := reader.read(count=512, block_ms=10):
            reader.ack(entry_id for entry_id, _ in batch)
            read += len(batch)
        read_s = time.perf_counter() - start

    P, C = 256, 1024
    result = {
        "bench": "capture",
        "record": {"positions": args.positions, "k": args.k, "context_tokens": args.context, "vocab": 49_152},
        "records": args.records,
        "records_written": writer.written,
        "queue_full_retries": refused,
        "writer_records_per_s": round(writer.written / elapsed),
        "writer_mb_per_s": round(writer.written * record_bytes / elapsed / 1e6, 1),
        "writer_positions_per_s": round(writer.written * args.positions / elapsed),
        "put_p50_us": round(float(np.percentile(put_s, 50)) * 1e6, 1),
        "put_p99_us": round(float(np.percentile(put_s, 99)) * 1e6, 1),
        "encode_us": round(per_call_us(encode, records[0]), 1),
        "decode_us": round(per_call_us(decode, encode(records[0])), 1),
        "reader_records_per_s": round(read / read_s),
        "bytes_per_record": record_bytes,
        "bytes_per_position_k32": (encoded_size(P, 300) - encoded_size(0, 300)) / P,
        "bytes_per_position_k32_vocab128k": (encoded_size(P, 300, 128_256) - encoded_size(0, 300, 128_256))
        / P,
        "context_bytes_per_token": (encoded_size(4, 2 * C) - encoded_size(4, C)) / C,
        "context_bytes_per_token_vocab128k": (encoded_size(4, 2 * C, 128_256) - encoded_size(4, C, 128_256))
        / C,
        "fixed_bytes_per_record": encoded_size(0, 1) - 2,  # header: ids, model, sampling, tags
        "redis_bytes_per_record": round(stream_memory / length, 1),
        "stream_cap_records": cap,
        "stream_cap_mb": round(cap * stream_memory / length / 1e6, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
