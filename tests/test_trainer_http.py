"""The worker's HTTP port against the real uvicorn server (httpx over a socket): every endpoint, the 404s a
request naming anything outside a registered version gets, a 500 that leaves the server up, and a clean stop."""

import socket

import httpx
import pytest
from prometheus_client import Counter

from lkserve.trainer.http import WorkerHTTP

PROBE = Counter("lkserve_test_http_probe_total", "Counted once by the HTTP test")


@pytest.fixture
def server(tmp_path):
    ckpt = tmp_path / "disk" / "v0001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text('{"a": 1}')
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (ckpt / ".hidden").write_text("secret")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "x.bin").write_bytes(b"x")
    (tmp_path / "disk" / "outside.txt").write_text("outside")
    registry = {"v0001": {"path": str(ckpt), "sha256": "ab" * 32}, "gone": {"path": str(tmp_path / "nope")}}

    def resolve(version):
        if version == "boom":
            raise RuntimeError("registry down")
        return registry.get(version)

    http = WorkerHTTP(resolve, port=0, host="127.0.0.1").start()
    yield f"http://127.0.0.1:{http.port}", ckpt, http
    http.stop()


def test_metrics(server):
    url, _, _ = server
    PROBE.inc()
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "lkserve_test_http_probe_total 1.0" in r.text


@pytest.mark.parametrize("path", ["/drafts/v0001/", "/drafts/v0001"])
def test_manifest(server, path):
    url, _, _ = server
    r = httpx.get(url + path)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"version": "v0001", "sha256": "ab" * 32,
                        "files": [{"name": "config.json", "size": 8}, {"name": "model.safetensors", "size": 16384}]}


def test_files(server):
    url, ckpt, _ = server
    r = httpx.get(f"{url}/drafts/v0001/model.safetensors")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == (ckpt / "model.safetensors").read_bytes()
    assert int(r.headers["content-length"]) == 16384
    assert httpx.get(f"{url}/drafts/v0001/config.json").content == b'{"a": 1}'


@pytest.mark.parametrize("path", [
    "/", "/etc/passwd", "/metrics/x", "/drafts/", "/drafts/unknown/", "/drafts/gone/", "/drafts/v0001/missing.bin",
    "/drafts/v0001/.hidden", "/drafts/v0001/sub", "/drafts/v0001/sub/x.bin", "/drafts/v0001/%2e%2e%2foutside.txt",
    "/drafts/..%2fdisk/outside.txt", "/drafts/v0001/..%2f..%2fdisk%2foutside.txt", "/drafts/.v0001/"])
def test_not_found(server, path):
    url, _, _ = server
    r = httpx.get(url + path)
    assert r.status_code == 404, path
    assert r.json() == {"error": "not found"}


def test_errors_answer_500_and_the_server_stays_up(server):
    url, _, _ = server
    r = httpx.get(f"{url}/drafts/boom/")
    assert r.status_code == 500 and r.json() == {"error": "internal error"}
    assert httpx.get(f"{url}/drafts/v0001/").status_code == 200


def test_stop_closes_the_port(server):
    url, _, http = server
    assert httpx.get(f"{url}/metrics").status_code == 200
    http.stop()
    assert not http.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/metrics")
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", http.port))


def test_a_taken_port_fails_at_start():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            WorkerHTTP(lambda v: None, port=s.getsockname()[1], host="127.0.0.1").start()
