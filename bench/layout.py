"""`lkserve serve` in its two engine layouts, side by side in one run: tokens/s at 1 and 4 streams, idle CPU. JSON out.

Each configuration is a fresh `lkserve serve` process (what a user runs: `LKSERVE_ENGINE__LAYOUT`, the embedded
Redis, capture as configured, the real gateway over HTTP), for no speculation and the default 2-layer draft
(K=4), in both layouts:

- `in_process`: vLLM's worker runs inside the engine-core process (uniproc executor);
- `multiprocess`: vLLM's default, the worker a process of its own, driven over a shared-memory queue.

Streamed chat completions of MT-bench first turns, T=0, `--max-tokens` (128) with ignore_eos, at 1 stream
(`--requests-1` one after the other) and 4 streams (`--requests-4`, 4 at a time): output tokens/s over the
wall clock of the batch. While the 4 streams run, GET /health is polled: its slowest answer says whether the gateway's
event loop stays responsive while the engine generates. Then, after 2 s of rest, the CPU seconds that the serve
process tree (serve, EngineCore, Worker, redis-server) uses over `--idle-seconds` (10) with no requests.

Run (it starts vLLM engines): flock /tmp/lkserve-engine.lock .venv/bin/python bench/layout.py [--quick]
Writes bench/results/layout.json (and prints the same JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "layout.json"
LAYOUTS = ("in_process", "multiprocess")
TICK = os.sysconf("SC_CLK_TCK")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ processes
def tree(pid: int) -> dict[int, str]:
    """pid -> short name (vLLM's process title, else the executable) of `pid` and its live descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, IndexError):
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            name = argv[0].decode(errors="replace")
            out[p] = "serve" if p == pid else (name if name.startswith("VLLM") else Path(name).name)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (its own threads; children are counted as processes of the tree)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def idle_cpu(pid: int, seconds: float) -> dict:
    procs = tree(pid)
    before = {p: cpu_seconds(p) for p in procs}
    time.sleep(seconds)
    per = {}
    for p, name in procs.items():
        a, b = before[p], cpu_seconds(p)
        if a is not None and b is not None:
            per[f"{name}[{p}]"] = round(b - a, 2)
    return {"seconds": seconds, "cpu_seconds": round(sum(per.values()), 2), "per_process": per}


# ------------------------------------------------------------------------------------------------ load
async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    return {"tokens": tokens, "ttft": (first or time.perf_counter()) - t0}


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, out: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await client.get("/health")
        out.append((r.status_code, time.perf_counter() - t0))
        await asyncio.sleep(0.1)


async def load(url: str, model: str, prompts: list[str], concurrency: int, n: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client, \
            httpx.AsyncClient(base_url=url, timeout=60) as health_client:
        async def run(i):
            async with sem:
                return await one_stream(client, model, prompts[i % len(prompts)], max_tokens)

        stop, health = asyncio.Event(), []
        poller = asyncio.create_task(poll_health(health_client, stop, health))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        seconds = time.perf_counter() - t0
        stop.set()
        await poller
    tokens = sum(r["tokens"] for r in results)
    return {"requests": n, "concurrency": concurrency, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "ttft_ms_max": round(1000 * max(r["ttft"] for r in results), 1),
            "health_polls": len(health), "health_ok": all(s == 200 for s, _ in health),
            "health_ms_max": round(1000 * max((d for _, d in health), default=0.0), 1)}


# ------------------------------------------------------------------------------------------------ one serve
def start_serve(name: str, env_extra: dict, out: Path):
    from lkserve.cli.demo import Child, free_port, wait_ready

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LKSERVE_", "VLLM_ENABLE_V1_MULTIPROCESSING"))}  # the layout comes from settings
    env.update({"LKSERVE_GATEWAY__PORT": str(port), "LKSERVE_GATEWAY__HOST": "127.0.0.1",
                "LKSERVE_CACHE_DIR": str(out / "cache"), "VLLM_LOGGING_LEVEL": "WARNING", **env_extra})
    # no LKSERVE_REDIS__URL: serve's embedded Redis, its URL file under this run's own cache dir
    child = Child(name, [sys.executable, "-m", "lkserve.cli", "serve"], env, out / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    wait_ready(f"{url}/ready", child)
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    return child, url, model, time.perf_counter() - t0


def bench_one(name: str, env_extra: dict, prompts: list[str], args, out: Path) -> dict:
    log(f"{name}: starting lkserve serve ...")
    child, url, model, ready_s = start_serve(name, env_extra, out)
    try:
        procs = sorted(tree(child.proc.pid).values())
        asyncio.run(load(url, model, prompts, 2, 2, 8))  # warm-up: one-off costs of the first steps
        res = {"ready_seconds": round(ready_s, 1), "processes": procs}
        for c, n in ((1, args.requests_1), (4, args.requests_4)):
            res[f"c{c}"] = asyncio.run(load(url, model, prompts, c, n, args.max_tokens))
            log(f"  {name} c={c}: {res[f'c{c}']}")
        time.sleep(2.0)
        res["idle"] = idle_cpu(child.proc.pid, args.idle_seconds)
        log(f"  {name} idle: {res['idle']}")
        return res
    finally:
        child.stop()


def run(args) -> dict:
    from lkserve.config import default_cache_dir
    from lkserve.models.prepare import prepare_default_models
    from lkserve.prompts import mtbench_prompts

    target, draft = (str(p) for p in prepare_default_models(default_cache_dir()))
    prompts = [q["turns"][0] for q in mtbench_prompts()]
    out_dir = Path(tempfile.mkdtemp(prefix="lkserve-bench-layout-"))
    base_env = {"LKSERVE_ENGINE__TARGET_MODEL": target, "LKSERVE_ENGINE__DRAFT_MODEL": draft,
                "LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS": str(args.k), "LKSERVE_ENGINE__MAX_NUM_SEQS": "8",
                "LKSERVE_CAPTURE__ENABLED": "true" if args.capture == "on" else "false"}
    res = {"model": Path(target).name, "draft": Path(draft).name, "k": args.k, "max_tokens": args.max_tokens,
           "temperature": 0.0, "capture": args.capture, "requests_1_stream": args.requests_1,
           "requests_4_streams": args.requests_4, "logs": str(out_dir), "command": " ".join(sys.argv),
           "methods": {}}
    for i, method in enumerate(args.methods):
        order = LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]  # alternate who goes first: drift hits both alike
        runs = {}
        for layout in order:
            env = {**base_env, "LKSERVE_ENGINE__METHOD": method, "LKSERVE_ENGINE__LAYOUT": layout}
            runs[layout] = bench_one(f"{method}-{layout}", env, prompts, args, out_dir)
        runs["ratio_in_process_over_multiprocess"] = {
            c: round(runs["in_process"][c]["tokens_per_s"] / runs["multiprocess"][c]["tokens_per_s"], 3)
            for c in ("c1", "c4")}
        res["methods"][method] = {layout: runs[layout] for layout in (*LAYOUTS, "ratio_in_process_over_multiprocess")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["none", "draft_model"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-1", type=int, default=2, help="requests at 1 stream, one after the other")
    ap.add_argument("--requests-4", type=int, default=8, help="requests at 4 streams, 4 at a time")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--capture", choices=["on", "off"], default="on", help="serve's default is on")
    ap.add_argument("--quick", action="store_true", help="1 request at 1 stream, 4 at 4 streams")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/layout.json")
    args = ap.parse_args()
    if args.quick:
        args.requests_1, args.requests_4 = 1, 4
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    t0 = time.perf_counter()
    out = run(args)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out)
    if not args.no_write:
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(text, file=json_out)


if __name__ == "__main__":
    main()
