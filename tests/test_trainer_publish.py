"""Registry, publish and rollback units against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
import torch

from lkserve.checkpoint import sha256_file
from lkserve.drafts import AnnounceError, DraftRegistry
from lkserve.trainer.publish import clean_partial, publish, register_base, write_checkpoint
from lkserve.trainer.rollback import RollbackMonitor, manual_rollback
from lkserve.trainer.train import load_draft

torch.set_num_threads(1)


def _listen(url, channel, got, ready):
    c = redis.Redis.from_url(url)
    ps = c.pubsub()
    ps.subscribe(channel)
    ready.set()
    for msg in ps.listen():
        if msg["type"] == "message":
            got.append(json.loads(msg["data"]))
            if len(got) >= 2:
                break


def test_publish_writes_loadable_checkpoint_and_announces(tiny, redis_url, tmp_path):
    reg = DraftRegistry(redis_url, "t1")
    register_base(reg, tiny.random_draft)
    assert reg.current() == "base"
    got, ready = [], threading.Event()
    th = threading.Thread(target=_listen, args=(redis_url, reg.channel, got, ready), daemon=True)
    th.start()
    ready.wait(5)
    model = load_draft(tiny.random_draft)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    meta = publish(reg, model, tiny.random_draft, tmp_path, metadata={"loss": "lk_lambda", "records_seen": 7})
    path = tmp_path / "drafts" / meta["version"]
    assert meta["version"] == "v0001" and meta["path"] == str(path)
    assert sha256_file(path / "model.safetensors") == meta["sha256"]
    on_disk = json.loads((path / "lkserve-version.json").read_text())
    assert on_disk["sha256"] == meta["sha256"] and on_disk["records_seen"] == 7
    back = load_draft(path)
    assert torch.allclose(back.model.norm.weight, model.model.norm.weight)
    assert (path / "tokenizer.json").is_file()
    assert reg.current() == "v0001" and reg.previous() == "base"
    assert json.loads(reg.client.get("t1:drafts:latest")) == {"version": "v0001", "path": str(path),
                                                              "sha256": meta["sha256"]}
    manual_rollback(reg)
    th.join(5)
    assert [g["version"] for g in got] == ["v0001", "base"]
    assert reg.current() == "base" and reg.get("v0001")["status"] == "rolled_back"
    assert reg.previous() is None  # never back to the rolled-back version by default


def test_publish_stores_the_base_drafts_dtype(tiny, redis_url, tmp_path):
    """The trainer keeps fp32 master weights; a version is written in the dtype the base draft (and so the engine)
    uses, with the same tensor names (tied embeddings stay tied), and the trainer's copy is not touched."""
    from lkserve.checkpoint import safetensors_meta

    base = tmp_path / "base-bf16"
    load_draft(tiny.random_draft).to(torch.bfloat16).save_pretrained(str(base))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny.random_draft / f).is_file():
            (base / f).write_bytes((tiny.random_draft / f).read_bytes())
    reg = DraftRegistry(redis_url, "t-dtype")
    register_base(reg, base)
    model = load_draft(base)  # fp32
    meta = publish(reg, model, base, tmp_path / "cache", announce=False)
    got, ref = safetensors_meta(meta["path"]), safetensors_meta(base)
    assert set(got) == set(ref)
    assert {d for _, d in got.values()} == {"BF16"}
    assert model.dtype == torch.float32
    back = load_draft(meta["path"])
    assert torch.equal(back.model.norm.weight, model.model.norm.weight.to(torch.bfloat16).float())


def test_partial_dir_is_never_announced(tiny, redis_url, tmp_path):
    reg = DraftRegistry(redis_url, "t2")
    model = load_draft(tiny.random_draft)
    with pytest.raises(RuntimeError):
        write_checkpoint(model, tiny.random_draft, tmp_path, "v0009", _fail_after_weights=True)
    assert not (tmp_path / "drafts" / "v0009").exists()
    assert list((tmp_path / "drafts").iterdir()) == []  # temp dir cleaned up too
    # a temp dir left by a SIGKILLed writer is not announceable and is removed at start
    path, sha = write_checkpoint(model, tiny.random_draft, tmp_path, "v0010")
    partial = tmp_path / "drafts" / ".tmp-v0011-123"
    path.rename(partial)
    reg.register("v0011", partial, sha)
    with pytest.raises(AnnounceError):
        reg.announce("v0011")
    assert reg.current() is None
    assert clean_partial(tmp_path) == 1
    # a complete dir whose weights changed after registration is refused too
    path2, sha2 = write_checkpoint(model, tiny.random_draft, tmp_path, "v0012")
    reg.register("v0012", path2, "0" * 64)
    with pytest.raises(AnnounceError):
        reg.announce("v0012")
    reg.register("v0012", path2, sha2)
    assert reg.announce("v0012")["sha256"] == sha2
    with pytest.raises(AnnounceError):
        reg.announce("nope")


def test_a_killed_writer_leaves_only_a_temp_dir_that_clean_partial_removes(tiny, tmp_path):
    """SIGKILL in the middle of writing a version: no version directory appears, and the worker's start-up
    clean_partial removes the temp dir (and one named the way earlier writers named theirs)."""
    code = f"""
import os, signal
from lkserve.trainer.publish import write_checkpoint
def save(model, out, src):
    (out / "model.safetensors").write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
write_checkpoint(None, {str(tiny.random_draft)!r}, {str(tmp_path)!r}, "v0001", save=save)
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root, timeout=120)
    assert proc.returncode == -9
    drafts = tmp_path / "drafts"
    left = [p.name for p in drafts.iterdir()]
    assert len(left) == 1 and left[0].startswith(".v0001.tmp-"), left
    (drafts / ".tmp-v0002-123").mkdir()
    assert clean_partial(tmp_path) == 2
    assert list(drafts.iterdir()) == []


def test_pause_flag(redis_url):
    reg = DraftRegistry(redis_url, "t3")
    assert not reg.is_paused()
    reg.client.set("t3:adaptation:paused", "1")  # what the admin API writes
    assert reg.is_paused()
    reg.set_paused(False)
    assert not reg.is_paused()


def test_rollback_monitor_rule():
    import numpy as np

    class R:
        def __init__(self, v, acc):
            self.draft_version, self.accepted = v, np.array(acc, bool)
            self.num_positions = len(acc)

    m = RollbackMonitor(window_tokens=100, margin=0.1)
    for _ in range(20):
        m.observe(R("a", [1, 1, 0, 1, 0]))  # 0.6
    assert m.check("b", "a") is None  # no evidence on b
    for _ in range(10):
        m.observe(R("b", [1, 0, 0, 0, 0]))
    assert m.check("b", "a") is None  # 50 < window
    for _ in range(10):
        m.observe(R("b", [1, 0, 0, 0, 0]))
    d = m.check("b", "a")
    assert d.rollback and d.rate == pytest.approx(0.2) and d.previous_rate == pytest.approx(0.6)
    m2 = RollbackMonitor(window_tokens=100, margin=0.1)
    for _ in range(20):
        m2.observe(R("a", [1, 1, 0, 1, 0]))
        m2.observe(R("c", [1, 1, 0, 0, 1]))
    assert not m2.check("c", "a").rollback


def test_publish_skips_versions_an_earlier_run_left_on_disk(tiny, redis_url, tmp_path):
    """A registry that restarts its count (the embedded Redis keeps nothing by default) while the cache dir holds an
    earlier run's v0001: the next publish is v0002, and v0001's files are untouched."""
    reg = DraftRegistry(redis_url, "t-forgot")
    for key in reg.client.scan_iter("t-forgot:*"):
        reg.client.delete(key)
    old = tmp_path / "drafts" / "v0001"
    old.mkdir(parents=True)
    (old / "marker").write_text("earlier run")
    meta = publish(reg, load_draft(tiny.random_draft), tiny.random_draft, tmp_path, announce=False)
    assert meta["version"] == "v0002" and (old / "marker").read_text() == "earlier run"
