"""Draft weights without a shared filesystem: the worker serves registered checkpoints over HTTP, an announcement
carries url + sha256, and a gateway fetches, verifies and swaps (real HTTP, real Redis, real engine)."""

import json
import shutil

import httpx
import pytest

from lkserve.checkpoint import sha256_file
from lkserve.drafts import DraftRegistry
from lkserve.gateway.draft_fetch import FetchError, fetch_checkpoint
from lkserve.gateway.draft_updates import DraftManager
from lkserve.trainer.http import WorkerHTTP
from lkserve.trainer.publish import register_base


@pytest.fixture
def worker_http(redis_url, tiny, tmp_path):
    """A registry whose versions carry URLs, the worker's HTTP server, and version "remote" = the target's weights."""
    registry = DraftRegistry(redis_url, "dist")
    server = WorkerHTTP(registry.get, port=0, host="127.0.0.1").start()  # port 0: any free one
    public = f"http://127.0.0.1:{server.port}"
    registry.public_url = public
    src = tmp_path / "worker-disk" / "remote"
    shutil.copytree(tiny.copy_draft, src)
    registry.register("remote", src, sha256_file(src / "model.safetensors"))
    yield registry, public, src
    server.stop()


def test_worker_serves_registered_checkpoints_only(worker_http):
    registry, public, src = worker_http
    manifest = httpx.get(f"{public}/drafts/remote/").json()
    assert manifest["sha256"] == registry.get("remote")["sha256"]
    assert {f["name"] for f in manifest["files"]} == {p.name for p in src.iterdir() if p.is_file()}
    assert httpx.get(f"{public}/drafts/remote/config.json").content == (src / "config.json").read_bytes()
    assert httpx.get(f"{public}/metrics").status_code == 200
    # (a literal "/../" is normalised away by the client; the encoded forms reach the server)
    for bad in ("/drafts/unknown/", "/drafts/remote/missing.bin",
                "/drafts/remote/%2e%2e%2fconfig.json", "/drafts/..%2f..%2fetc/passwd", "/etc/passwd", "/"):
        assert httpx.get(public + bad).status_code == 404, bad


def test_announcement_carries_url(worker_http, redis_client):
    registry, public, _ = worker_http
    register_base(registry, worker_http[2], "base")  # registered through a registry with a public URL
    ann = registry.announce("remote")
    assert ann["url"] == f"{public}/drafts/remote" and ann["sha256"] == registry.get("remote")["sha256"]
    assert json.loads(redis_client.get("dist:drafts:latest"))["url"] == ann["url"]


async def _fetch(*a):
    return await fetch_checkpoint(*a)


def test_fetch_verifies_sha256_and_leaves_nothing_on_mismatch(worker_http, tmp_path):
    import asyncio

    registry, public, src = worker_http
    sha = registry.get("remote")["sha256"]
    dest = tmp_path / "gateway-disk"
    with pytest.raises(FetchError, match="hashes to"):
        asyncio.run(_fetch(f"{public}/drafts/remote", "remote", "0" * 64, dest))
    assert not any(dest.iterdir())  # no partial or unverified directory left behind
    got = asyncio.run(_fetch(f"{public}/drafts/remote", "remote", sha, dest))
    assert got == dest / "remote"
    for f in src.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(FetchError):
        asyncio.run(_fetch(f"{public}/drafts/unknown", "unknown", sha, dest))


@pytest.mark.slow
def test_gateway_fetches_announced_version_and_swaps(worker_http, spec_engine, tmp_path):
    registry, _public, _ = worker_http
    spec_engine.use_draft("random")
    meta = registry.get("remote")
    manager = DraftManager(spec_engine.engine, fetch_dir=tmp_path / "fetched")
    # the path is the worker's, not on "this" machine: only the URL can bring the weights
    tampered = json.dumps({"version": "remote", "path": "/nonexistent/worker/remote", "sha256": "f" * 64,
                           "url": meta["url"]})
    entry = spec_engine.run(manager.handle_announcement(tampered))
    assert not entry.ok and "fetch failed" in entry.reason and spec_engine.engine.draft_version == "random"
    good = json.dumps({"version": "remote", "path": "/nonexistent/worker/remote", "sha256": meta["sha256"],
                       "url": meta["url"]})
    entry = spec_engine.run(manager.handle_announcement(good))
    try:
        assert entry.ok, entry
        assert spec_engine.engine.draft_version == "remote"
        assert entry.path == str(tmp_path / "fetched" / "remote")
    finally:
        spec_engine.use_draft("random")
