"""Serving through the gateway with the official `openai` client: throughput and latency, capture cost, hot-swap.

Streams chat completions (MT-bench first turns, T=1, seeded, `--max-tokens`) at 1, 4 and 8 concurrent streams and
reports output tokens/s, time to first token and inter-chunk latency percentiles (one chunk per engine step, so a
speculative step that emits several tokens is one chunk, as in vLLM's own serving benchmark), plus per-output-token
time. Configurations, each a fresh `lkserve serve` process (embedded Redis):

- `none`: no speculation; `ngram`: vLLM's prompt-lookup speculator;
- `initial`: the default draft, capture on; in the same process: capture on vs off, alternated on/off/on/off at each
  concurrency (the ratio on/off of tokens/s; same seeds, so the same outputs); a hot-swap to the adapted draft under
  4 streams (failed requests, the longest chunk gap while the swap ran vs the median); then `adapted` (the adapted
  draft serving, capture on);
- `vllm_server`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) with the same model and
  speculative config, against `initial` with capture off: the gateway's overhead.

The adapted draft is `--adapted` (default: the LK-lambda seed-0 version that bench/adaptation.py wrote).
Run: .venv/bin/python bench/serving.py [--requests 16] [--max-tokens 64] > bench/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ADMIN_KEY = "bench-admin"
SERVED_NAME = "bench-model"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(q / 100 * len(s)))], 2)  # ms


# ------------------------------------------------------------------------------------------------ load
async def one_stream(client, model: str, prompt: str, max_tokens: int, seed: int, chunk_times: list) -> dict:
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=1.0,
            seed=seed, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                    chunk_times.append((last, now))
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result here
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "gaps": gaps, "tokens": tokens, "latency": end - t0,
            "tpot": (end - first) / (tokens - 1) if first and tokens > 1 else None}


async def load(base_url: str, model: str, prompts: list[str], concurrency: int, n: int, max_tokens: int,
               during=None) -> dict:
    """n streamed requests, `concurrency` at a time. `during(progress)` runs alongside (the hot-swap)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    chunk_times: list = []
    done = [0]

    async def run(i):
        async with sem:
            r = await one_stream(client, model, prompts[i % len(prompts)], max_tokens, 1000 + i, chunk_times)
            done[0] += 1
            return r

    t0 = time.perf_counter()
    side = asyncio.create_task(during(done, n, chunk_times)) if during else None
    results = await asyncio.gather(*(run(i) for i in range(n)))
    seconds = time.perf_counter() - t0
    side_result = await side if side else None
    await client.close()
    ok = [r for r in results if "error" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    out = {"concurrency": concurrency, "requests": n, "failed": n - len(ok),
           "errors": sorted({r["error"] for r in results if "error" in r})[:3],
           "tokens": sum(r["tokens"] for r in ok), "seconds": round(seconds, 2),
           "tokens_per_s": round(sum(r["tokens"] for r in ok) / seconds, 1),
           "ttft_ms": {"p50": pct([r["ttft"] for r in ok], 50), "p90": pct([r["ttft"] for r in ok], 90),
                       "p99": pct([r["ttft"] for r in ok], 99)},
           "itl_ms": {"p50": pct(gaps, 50), "p90": pct(gaps, 90), "p99": pct(gaps, 99)},
           "tpot_ms_mean": round(1000 * statistics.mean([r["tpot"] for r in ok if r["tpot"]]), 2)
           if any(r["tpot"] for r in ok) else None}
    if side_result is not None:
        window = side_result.pop("window", None)
        if window:  # chunk gaps of any stream that overlapped the swap call: what a client felt
            t0, t1 = window
            over = [b - a for a, b in chunk_times if a < t1 and b > t0]
            side_result["overlapping_gaps"] = len(over)
            side_result["overlapping_gap_ms_max"] = round(1000 * max(over), 1) if over else None
            side_result["gap_ms_p50_whole_run"] = out["itl_ms"]["p50"]
        out["during"] = side_result
    return out


# ------------------------------------------------------------------------------------------------ servers
def start_gateway(name: str, env_extra: dict, out: Path):
    from lkserve.cli.demo import Child, free_port, wait_ready

    port = free_port()
    env = {**os.environ, "LKSERVE_GATEWAY__PORT": str(port), "LKSERVE_GATEWAY__HOST": "127.0.0.1",
           "LKSERVE_GATEWAY__ADMIN_KEY": ADMIN_KEY, "LKSERVE_GATEWAY__API_KEYS": '["bench"]',
           "LKSERVE_ENGINE__MAX_NUM_SEQS": "8", "LKSERVE_CACHE_DIR": str(out / "cache"), **env_extra}
    env.pop("LKSERVE_REDIS__URL", None)  # embedded Redis
    child = Child(name, [sys.executable, "-m", "lkserve.cli", "serve"], env, out / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/ready", child)
    model = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer bench"}).json()["data"][0]["id"]
    return child, url, model


def start_vllm_server(target: str, draft: str, k: int, out: Path):
    from lkserve.cli.demo import Child, free_port, wait_ready

    port = free_port()
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": k,
            "draft_sample_method": "probabilistic", "rejection_sample_method": "standard"}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--port", str(port),
            "--host", "127.0.0.1", "--served-model-name", SERVED_NAME, "--dtype", "auto", "--max-model-len", "2048",
            "--max-num-seqs", "8", "--enforce-eager", "--seed", "0", "--speculative-config", json.dumps(spec)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    child = Child("vllm_server", argv, env, out / "vllm_server.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/v1/models", child)
    return child, url, SERVED_NAME


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    r = httpx.request(method, f"{url}/admin{path}", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=120)
    r.raise_for_status()
    return r.json()


# ------------------------------------------------------------------------------------------------ main
async def levels(url, model, prompts, args) -> dict:
    out = {}
    for c in args.concurrency:
        out[f"c{c}"] = await load(url, model, prompts, c, max(args.requests, 2 * c), args.max_tokens)
        log(f"    c={c}: {out[f'c{c}']['tokens_per_s']} tok/s, ttft p50 {out[f'c{c}']['ttft_ms']['p50']} ms, "
            f"failed {out[f'c{c}']['failed']}")
    return out


def run(args) -> dict:
    from lkserve.config import default_cache_dir
    from lkserve.models.prepare import prepare_default_models
    from lkserve.prompts import mtbench_prompts

    target, draft = (str(p) for p in prepare_default_models(default_cache_dir()))
    adapted = args.adapted or str(Path(default_cache_dir()) / "bench" / "adaptation" / "drafts" / "lk_lambda-s0")
    if not Path(adapted).is_dir():
        log(f"no adapted draft at {adapted}: run bench/adaptation.py first, or pass --adapted")
        adapted = None
    prompts = [q["turns"][0] for q in mtbench_prompts()]
    out_dir = Path(tempfile.mkdtemp(prefix="lkserve-bench-serving-"))
    base_env = {"LKSERVE_ENGINE__TARGET_MODEL": target, "LKSERVE_ENGINE__DRAFT_MODEL": draft,
                "LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS": str(args.k)}
    res = {"model": Path(target).name, "draft": Path(draft).name, "adapted": adapted, "k": args.k,
           "max_tokens": args.max_tokens, "temperature": 1.0, "logs": str(out_dir), "configs": {}}
    cfgs = res["configs"]
    for name, extra in (("none", {"LKSERVE_ENGINE__METHOD": "none", "LKSERVE_CAPTURE__ENABLED": "false"}),
                        ("ngram", {"LKSERVE_ENGINE__METHOD": "ngram", "LKSERVE_CAPTURE__ENABLED": "false"})):
        log(f"{name}: starting the gateway ...")
        child, url, model = start_gateway(name, {**base_env, **extra}, out_dir)
        try:
            asyncio.run(load(url, model, prompts, 2, 2, 8))  # warm-up
            cfgs[name] = asyncio.run(levels(url, model, prompts, args))
        finally:
            child.stop()

    log("initial draft: starting the gateway ...")
    child, url, model = start_gateway("initial", {**base_env, "LKSERVE_ENGINE__METHOD": "draft_model"}, out_dir)
    try:
        asyncio.run(load(url, model, prompts, 2, 2, 8))
        cfgs["initial"] = asyncio.run(levels(url, model, prompts, args))
        # capture on vs off, alternated in one process so drift on a shared machine hits both alike
        cap = {}
        for c in args.concurrency:
            runs = {"on": [], "off": []}
            for state in ("off", "on", "off", "on"):
                admin(url, "PUT", "/capture", {"enabled": state == "on"})
                runs[state].append(asyncio.run(load(url, model, prompts, c, max(args.requests, 2 * c),
                                                    args.max_tokens))["tokens_per_s"])
            on, off = statistics.mean(runs["on"]), statistics.mean(runs["off"])
            cap[f"c{c}"] = {"on_tokens_per_s": runs["on"], "off_tokens_per_s": runs["off"],
                            "ratio_on_over_off": round(on / off, 3)}
            log(f"    capture c={c}: on/off = {on:.1f}/{off:.1f} = {on / off:.3f}")
        admin(url, "PUT", "/capture", {"enabled": True})
        res["capture_on_vs_off"] = cap
        res["capture_ratio_min"] = min(v["ratio_on_over_off"] for v in cap.values())
        if adapted:
            async def swap_midway(done, n, chunk_times):
                while done[0] < n // 3:
                    await asyncio.sleep(0.05)
                t0 = time.perf_counter()
                r = await asyncio.to_thread(admin, url, "POST", "/draft/promote",
                                            {"version": "adapted", "path": adapted})
                t1 = time.perf_counter()
                return {"swap": r, "swap_request_seconds": round(t1 - t0, 3), "window": (t0, t1)}

            sw = asyncio.run(load(url, model, prompts, 4, max(args.requests, 12), args.max_tokens,
                                  during=swap_midway))
            res["hot_swap_under_load"] = sw
            log(f"    hot-swap under 4 streams: failed {sw['failed']}, swap {sw['during']['swap_request_seconds']} s")
            cfgs["adapted"] = asyncio.run(levels(url, model, prompts, args))
    finally:
        child.stop()

    log("vLLM's own OpenAI server: starting ...")
    child, url, model = start_vllm_server(target, draft, args.k, out_dir)
    try:
        asyncio.run(load(url, model, prompts, 2, 2, 8))
        cfgs["vllm_server"] = asyncio.run(levels(url, model, prompts, args))
    finally:
        child.stop()
    res["gateway_vs_vllm_server_tokens_per_s"] = {
        c: round(cfgs["initial"][c]["tokens_per_s"] / cfgs["vllm_server"][c]["tokens_per_s"], 3)
        for c in cfgs["initial"]}
    base = cfgs["none"]
    res["speedup_vs_none"] = {name: {c: round(r[c]["tokens_per_s"] / base[c]["tokens_per_s"], 3) for c in r}
                              for name, r in cfgs.items() if name != "none"}
    return res



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16, help="requests per load level (at least 2x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--adapted", default=None, help="an adapted draft checkpoint dir")
    args = ap.parse_args()
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    t0 = time.perf_counter()
    out = run(args)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), file=json_out)


if __name__ == "__main__":
    main()
