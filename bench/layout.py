"""`lkserve serve` in its two engine layouts, side by side in one run: tokens/s at 1 and 4 streams, idle CPU. JSON out.

Each configuration is a fresh `lkserve serve` process (what a user runs: `LKSERVE_ENGINE__LAYOUT`, the embedded
Redis, capture as configured, the real gateway over HTTP), for no speculation and the default 2-layer draft
(K=4), in both layouts:

- `in_process`: vLLM's worker runs inside the engine-core process (uniproc executor);
- `multiprocess`: vLLM's default, the worker a process of its own, driven over a shared-memory queue.

Streamed chat completions of MT-bench first turns, T=0, `--max-tokens` (128) with ignore_eos, at 1 stream
(`--requests-1` one after the other) and 4 streams (`--requests-4`, 4 at a time): output tokens/s over the
wall clock of the batch. While the 4 streams run, GET /health is polled: its slowest answer says whether the gateway's
event loop stays responsive while the engine generates. Both layouts' serves run at once and take turns (`--rounds`),
so drift on a shared machine hits both alike; tokens/s is the median of the turns. Then, after 2 s of rest, the CPU
seconds that each serve process tree (serve, EngineCore, Worker, redis-server) uses over `--idle-seconds` (10) with no
requests, and one more 1-stream request (`after_idle_c1`: its time to first token after the rest).

Run (it starts vLLM engines): flock /tmp/lkserve-engine.lock .venv/bin/python bench/layout.py [--quick]
Writes bench/results/layout.json (and prints the same JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
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


def host_cpu() -> dict:
    """The CPU a figure was measured on (figures from different CPUs do not compare): its model, the CPUs this
    process may use, and the flags that decide how fast bf16 and wide fp32 matmuls run."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    first = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
    flags = set(first("flags").split())
    return {"model": first("model name"), "cpus": len(os.sched_getaffinity(0)),
            **{f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16")}}


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


def bench_method(method: str, base_env: dict, prompts: list[str], args, out: Path) -> dict:
    """Both layouts' serves up at once, loaded in turn (`--rounds` rounds, the first layout alternating): an idle serve
    costs ~0 CPU, and the turns spread the drift of a shared machine over both layouts alike."""
    servers, res = {}, {}
    try:
        for layout in LAYOUTS:
            name = f"{method}-{layout}"
            log(f"{name}: starting lkserve serve ...")
            env = {**base_env, "LKSERVE_ENGINE__METHOD": method, "LKSERVE_ENGINE__LAYOUT": layout}
            servers[layout] = start_serve(name, env, out)
            child, url, model, ready_s = servers[layout]
            res[layout] = {"ready_seconds": round(ready_s, 1), "processes": sorted(tree(child.proc.pid).values()),
                           "c1": [], "c4": []}
            asyncio.run(load(url, model, prompts, 2, 2, 8))  # warm-up: one-off costs of the first steps
        for r in range(args.rounds):
            for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                _, url, model, _ = servers[layout]
                # the other serve's processes keep spinning for a while after its last request (vLLM's shared-memory
                # queue polls, OpenMP threads spin-wait): without a pause the first request of a turn after it
                # (seen: in_process at 1 stream after multiprocess) waited ~0.9 s for its first token
                time.sleep(args.settle_seconds)
                for c, n in ((1, args.requests_1), (4, args.requests_4)):
                    one = asyncio.run(load(url, model, prompts, c, n, args.max_tokens))
                    res[layout][f"c{c}"].append(one)
                    log(f"  {method}-{layout} round {r} c={c}: {one}")
        for layout in LAYOUTS:  # idle: after the work, both serves idle, each tree measured on its own
            time.sleep(2.0)
            res[layout]["idle"] = idle_cpu(servers[layout][0].proc.pid, args.idle_seconds)
            log(f"  {method}-{layout} idle: {res[layout]['idle']}")
            # the first request after the rest: does waking an idle engine cost its time to first token?
            _, url, model, _ = servers[layout]
            res[layout]["after_idle_c1"] = asyncio.run(load(url, model, prompts, 1, 1, args.max_tokens))
            log(f"  {method}-{layout} after idle: {res[layout]['after_idle_c1']}")
    finally:
        for child, *_ in servers.values():
            child.stop()
    for layout in LAYOUTS:
        for c in ("c1", "c4"):
            runs = res[layout][c]
            res[layout][f"{c}_tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in runs)
            res[layout][f"{c}_health_ms_max"] = max(x["health_ms_max"] for x in runs)
    res["ratio_in_process_over_multiprocess"] = {
        c: round(res["in_process"][f"{c}_tokens_per_s"] / res["multiprocess"][f"{c}_tokens_per_s"], 3)
        for c in ("c1", "c4")}
    res["ratio_per_round"] = {
        c: [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(res["in_process"][c],
                                                                           res["multiprocess"][c])]
        for c in ("c1", "c4")}
    return res


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
           "temperature": 0.0, "capture": args.capture, "rounds": args.rounds, "requests_1_stream": args.requests_1,
           "requests_4_streams": args.requests_4, "logs": str(out_dir),
           "command": " ".join(["bench/layout.py", *sys.argv[1:]]), "methods": {}}
    for method in args.methods:
        res["methods"][method] = bench_method(method, base_env, prompts, args, out_dir)
    res["summary"] = {m: {**r["ratio_in_process_over_multiprocess"],
                          **{f"{layout}_{c}_tokens_per_s": r[layout][f"{c}_tokens_per_s"]
                             for layout in LAYOUTS for c in ("c1", "c4")},
                          **{f"{layout}_idle_cpu_seconds": r[layout]["idle"]["cpu_seconds"] for layout in LAYOUTS}}
                      for m, r in res["methods"].items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["none", "draft_model"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="turns per layout (tokens/s: the median)")
    ap.add_argument("--requests-1", type=int, default=1, help="requests per turn at 1 stream, one after the other")
    ap.add_argument("--requests-4", type=int, default=4, help="requests per turn at 4 streams, 4 at a time")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--settle-seconds", type=float, default=3.0, help="pause before each turn")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--capture", choices=["on", "off"], default="on", help="serve's default is on")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/layout.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 2
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
