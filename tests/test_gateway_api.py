"""The gateway live: uvicorn on a loopback port around the session's tiny spec engine (real vLLM), real Redis, and
the official `openai` client (sync and async, streaming and not).

The server runs on the engine's own event loop (conftest.LoopThread); tests talk to it over HTTP from the
main thread. Everything that changes the shared engine (draft version, capture setting) is put back afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import redis
import uvicorn

from lkserve.config import CaptureSettings, GatewaySettings, RedisSettings, Settings
from lkserve.gateway import create_app

API_KEY, ADMIN_KEY = "sk-gw-test-0123456789", "admin-gw-test-0123456789"
PREFIX = "lkgwtest"


class LiveServer:
    """uvicorn serving `app` on the engine loop, on a free loopback port."""

    def __init__(self, app, loop):
        self.app = app
        self.loop = loop
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.future = asyncio.run_coroutine_threadsafe(self.server.serve(), loop.loop)
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self.future.done():
                self.future.result()
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def state(self):
        return self.app.state.gw

    def stop(self):
        self.server.should_exit = True
        self.future.result(timeout=30)


@pytest.fixture(scope="module")
def live(spec_engine, redis_server):
    # a fresh registry per module: admin promotes of an earlier module must not reach this gateway's subscriber
    r = redis.Redis.from_url(redis_server.url)
    for key in r.scan_iter(f"{PREFIX}:drafts*"):
        r.delete(key)
    r.close()
    settings = Settings(
        gateway=GatewaySettings(api_keys=[API_KEY], admin_key=ADMIN_KEY, max_queued_requests=64),
        redis=RedisSettings(url=redis_server.url, key_prefix=PREFIX),
        capture=CaptureSettings(enabled=True, sample_rate=1.0),
    )
    app = create_app(spec_engine.engine, settings)
    server = LiveServer(app, spec_engine.loop)
    deadline = time.monotonic() + 10
    while not server.state.drafts._subscribed.is_set():
        assert time.monotonic() < deadline, "draft subscriber did not subscribe"
        time.sleep(0.02)
    server.handle = spec_engine
    yield server
    server.stop()
    spec_engine.run(spec_engine.engine.set_capture(True, 1.0))
    spec_engine.use_draft("random")
    spec_engine.drain()  # leave the shared memory sink as we found it


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(live):
    return live.state.engine.model_id


def admin(live, method, path, **kw) -> httpx.Response:
    return httpx.request(method, f"{live.url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=60, **kw)


def post(live, path, body=None, key=API_KEY, timeout=60, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=timeout, **kw)


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_error(resp: httpx.Response, status: int, param="__any__", code="__any__") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------------------------------------------- happy paths
def test_models_health_ready_metrics(live, client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert client.models.retrieve(model).id == model
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{live.url}/ready").json()
    assert ready["status"] == "ready" and ready["draft_version"] == live.state.engine.draft_version
    metrics = httpx.get(f"{live.url}/metrics")
    assert metrics.status_code == 200 and "# TYPE" in metrics.text


def test_completion_usage_and_speculative_stats(live, client, model):
    tok = live.state.engine.tokenizer
    prompt = "def main(argv):\n    parser = argparse.ArgumentParser("
    r = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    spec = r.usage.model_extra["speculative"]
    assert spec["draft_version"] == live.state.engine.draft_version
    assert spec["num_draft_tokens"] > 0 and 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert spec["mean_acceptance_length"] >= 1.0 and len(spec["accepted_per_position"]) == 4


def test_streaming_equals_non_streaming(client, model):
    kw = {"model": model, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
    a = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == a
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_seed_reproducible_at_positive_temperature(client, model):
    """Fails without lkserve.engine.vllm.patches.apply_seeded_draft_fix: vLLM draws probabilistic draft tokens
    from the global RNG."""
    kw = {"model": model, "prompt": "The quick brown fox", "max_tokens": 32, "temperature": 0.9, "seed": 1234,
          "extra_body": {"ignore_eos": True}}
    texts = [client.completions.create(**kw).choices[0].text for _ in range(3)]
    assert texts[0] == texts[1] == texts[2], "same seed at T>0 must give the same text"
    assert client.completions.create(**{**kw, "seed": 99}).choices[0].text != texts[0]


def test_n_choices_and_prompt_lists(client, model):
    r = client.completions.create(model=model, prompt=["Hello there", "import os"], n=2, max_tokens=8,
                                  temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text  # choice i uses seed + i
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert 4 <= r.usage.completion_tokens <= 32


def test_echo_and_token_prompts(live, client, model):
    ids = live.state.engine.tokenizer.encode("x = {'a': 1}")
    r = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text.startswith(live.state.engine.tokenizer.decode(ids))
    assert r.usage.prompt_tokens == len(ids)


def _stop_from(text: str) -> str:
    """A short printable piece from the middle of a generated text."""
    for m in re.finditer(r"[A-Za-z]{2}", text):
        if m.start() >= 3:
            return m.group(0)
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings_streaming_and_not(client, model):
    kw = {"model": model, "max_tokens": 40, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    prompt = "import json\nimport os\n\nclass Config:\n"
    full = client.completions.create(prompt=prompt, **kw).choices[0].text
    stop = _stop_from(full)
    expected = full[: full.index(stop)]
    r = client.completions.create(prompt=prompt, stop=[stop, "never-there"], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(prompt=prompt, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    # chat too
    msgs = [{"role": "user", "content": "Tell me about json."}]
    chat_full = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].message.content
    cstop = _stop_from(chat_full)
    chunks = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0, stop=cstop,
                                            stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_full[: chat_full.index(cstop)]


def test_chat_sync_and_async(live, client, model):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
        try:
            stream = await aclient.chat.completions.create(
                model=model, messages=msgs, max_completion_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            plain = await aclient.chat.completions.create(model=model, messages=msgs, max_tokens=12,
                                                          temperature=0, extra_body={"ignore_eos": True})
            return chunks, plain
        finally:
            await aclient.close()

    chunks, plain = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert plain.choices[0].message.content == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.model_extra["speculative"]["num_draft_tokens"] > 0


def test_capture_tags_and_opt_out(live, client, model):
    live.handle.drain()
    tagged = client.completions.create(model=model, prompt="with open(path) as f:", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "lkserve": {"tags": {"domain": "code"}}})
    opted_out = client.completions.create(model=model, prompt="with open(path) as f:", max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True, "capture": False})

    def records():
        got = live.handle.drain()
        records.all.extend(got)
        return [r for r in records.all if r.request_id.startswith(tagged.id)]

    records.all = []
    wait_until(lambda: records(), timeout=10, what="capture records of the tagged request")
    assert all(r.tags.get("domain") == "code" for r in records.all if r.request_id.startswith(tagged.id))
    assert not [r for r in records.all if r.request_id.startswith(opted_out.id)]


def test_capture_opt_out_header_on_both_endpoints(live, model, redis_url):
    """`x-lkserve-no-capture: 1` (docs/capture.md) keeps a request out of the Redis capture stream, on both
    endpoints; the same request without the header is recorded. The engine's capture points at a real Redis stream
    for this test, then back at its memory sink."""
    from lkserve.capture.reader import StreamReader
    from lkserve.capture.sink import redis_sink_spec

    engine, stream = live.handle.engine, "gwtest:optout"
    sink = redis_sink_spec(redis_url, RedisSettings(stream=stream, stream_maxlen=10_000), CaptureSettings())
    live.handle.run(engine.configure_capture(engine.capture_settings, sink))
    reader = StreamReader(redis_url, stream=stream, group="g", consumer="c")
    try:
        for path, body in [("/v1/completions", {"prompt": "with open(path) as f:"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "with open(path)"}]})]:
            body = {"model": model, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **body}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            dropped = httpx.post(f"{live.url}{path}", json=body, timeout=60,
                                 headers={**headers, "X-LKServe-No-Capture": "1"})
            kept = httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=60)
            assert dropped.status_code == kept.status_code == 200, (dropped.text, kept.text)
            got: list = []

            def recorded(rid: str, got=got) -> list:
                return [r for _, r in got if r.request_id.startswith(rid)]

            deadline = time.monotonic() + 30
            while not recorded(kept.json()["id"]) and time.monotonic() < deadline:
                got += reader.read(count=100, block_ms=200)
            # records leave in order: once the second request's are in the stream, the first's would be too
            assert recorded(kept.json()["id"]), (path, [r.request_id for _, r in got])
            assert not recorded(dropped.json()["id"]), path
            got += reader.read(count=100, block_ms=200)
            assert len(got) == len(recorded(kept.json()["id"])), path  # nothing else was added to the stream
    finally:
        reader.close()
        live.handle.run(engine.configure_capture(engine.capture_settings, {"kind": "memory", "maxlen": 100_000}))


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_need_the_engine(live, model):
    long_prompt = "hello " * 2000
    assert_error(post(live, "/v1/completions", {"model": model, "prompt": long_prompt}), 400, param="prompt",
                 code="context_length_exceeded")
    assert_error(post(live, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 10**9}), 400,
                 param="max_tokens", code="context_length_exceeded")
    assert_error(post(live, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}],
                                                     "max_completion_tokens": 10**6}), 400,
                 param="max_completion_tokens")
    assert_error(post(live, "/v1/completions", {"model": "gpt-17", "prompt": "hi"}), 404, param="model",
                 code="model_not_found")
    assert_error(post(live, "/v1/chat/completions", {"model": model, "messages": []}), 400, param="messages")
    assert_error(post(live, "/v1/completions", {"model": model, "prompt": [10**6]}), 400, param="prompt")
    assert_error(post(live, "/v1/completions", {"model": model, "prompt": "hi", "logprobs": 21}), 400,
                 param="logprobs")
    assert_error(post(live, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}],
                                                     "tools": [{"type": "function"}]}), 400, param="tools")
    # the openai client surfaces these as its own typed errors
    c = openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=model, prompt="hi", temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    # and the server is still fine
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_auth_live(live):
    assert_error(post(live, "/v1/completions", {"prompt": "hi"}, key=None), 401, code="missing_api_key")
    assert_error(post(live, "/v1/completions", {"prompt": "hi"}, key="sk-wrong"), 401, code="invalid_api_key")
    assert_error(post(live, "/v1/completions", {"prompt": "hi"}, key=ADMIN_KEY), 401)
    assert_error(httpx.get(f"{live.url}/admin/draft", headers={"Authorization": f"Bearer {API_KEY}"}), 401)
    assert_error(httpx.get(f"{live.url}/admin/draft"), 401)
    assert admin(live, "GET", "/draft").status_code == 200


def test_overload_answers_429_with_retry_after(live, model):
    """A second app on the same engine with one slot and no queue: the second request is refused at once."""
    small = create_app(live.state.engine, Settings(gateway=GatewaySettings(max_queued_requests=0)), max_running=1)
    server = LiveServer(small, live.handle.loop)
    try:
        body = {"model": model, "prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # keep it: dropping the iterator closes the connection
            assert next(lines).startswith("data: ")
            assert small.state.gw.admission.running == 1
            resp = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60)
            err = assert_error(resp, 429, code="server_overloaded")
            assert err["type"] == "rate_limit_error"
            assert int(resp.headers["Retry-After"]) >= 1
        wait_until(lambda: small.state.gw.admission.running == 0, 10, "the slot to be released")
        ok = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------- disconnects
def _engine_idle(live):
    return live.state.engine.num_running == 0


def test_client_disconnect_mid_stream_aborts(live, model):
    wait_until(lambda: _engine_idle(live), 30, "an idle engine")
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
        assert live.state.engine.num_running == 1
    t0 = time.monotonic()
    wait_until(lambda: _engine_idle(live), 5, "the engine to drop the request")
    assert time.monotonic() - t0 < 5
    wait_until(lambda: live.state.admission.running == 0, 5, "the admission slot")


def test_client_disconnect_non_streaming_aborts(live, model):
    wait_until(lambda: _engine_idle(live), 30, "an idle engine")
    # far more work than the read timeout allows, even on an idle machine (the tiny model is fast)
    body = {"model": model, "messages": [{"role": "user", "content": "long story please"}], "max_tokens": 450,
            "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/chat/completions", body, timeout=httpx.Timeout(60, read=0.3))
    wait_until(lambda: _engine_idle(live), 5, "the engine to drop every choice")


# ---------------------------------------------------------------------------------------------------- drafts
def test_draft_announcement_swaps_under_streaming_load(live, client, model, redis_server, tiny):
    TOKENS = 300  # long enough that the swap (~0.05 s after the announcement) lands mid-stream
    engine = live.state.engine
    live.handle.use_draft("random")
    r = redis.Redis.from_url(redis_server.url)
    results: list[dict] = []

    async def load():
        aclient = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        streaming = asyncio.Semaphore(0)  # released once per stream, at its first token

        async def one(i: int) -> dict:
            stream = await aclient.completions.create(
                model=model, prompt=f"Request {i}: the", max_tokens=TOKENS, temperature=0.8, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, finish, usage = [], None, None
            async for c in stream:
                if c.choices:
                    if not text:
                        streaming.release()
                    text.append(c.choices[0].text)
                    finish = c.choices[0].finish_reason or finish
                if c.usage:
                    usage = c.usage
            return {"text": "".join(text), "finish": finish, "usage": usage, "version_at_end": engine.draft_version}

        tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
        for _ in tasks:  # announce while all four are mid-stream
            await asyncio.wait_for(streaming.acquire(), 60)
        assert not any(t.done() for t in tasks)
        r.publish(f"{PREFIX}:drafts", json.dumps({"version": "gw-copy", "path": str(tiny.copy_draft),
                                                  "sha256": None}))
        try:
            results.extend(await asyncio.gather(*tasks))
        finally:
            await aclient.close()

    asyncio.run(load())
    assert [x["finish"] for x in results] == ["length"] * 4  # no request failed
    assert all(x["usage"].completion_tokens == TOKENS for x in results)
    wait_until(lambda: engine.draft_version == "gw-copy", 30, "the announced version")
    assert any(x["version_at_end"] == "gw-copy" for x in results), "the swap did not happen under load"
    assert httpx.get(f"{live.url}/ready").json()["draft_version"] == "gw-copy"
    status = admin(live, "GET", "/draft").json()
    assert status["version"] == "gw-copy" and status["history"][-1]["source"] == "announcement"
    # draft == target now: at T=0 everything drafted is accepted, and usage says which version served
    after = client.completions.create(model=model, prompt="hello", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).usage.model_extra["speculative"]
    assert after["draft_version"] == "gw-copy" and after["acceptance_rate"] > 0.9

    # a broken announcement: refused, the old version keeps serving, the reason is visible
    r.publish(f"{PREFIX}:drafts", json.dumps({"version": "gw-broken", "path": "/nonexistent/draft"}))
    r.publish(f"{PREFIX}:drafts", "not json")
    wait_until(lambda: admin(live, "GET", "/draft").json()["announcements_received"] >= status[
        "announcements_received"] + 2, 15, "the broken announcements")
    status = admin(live, "GET", "/draft").json()
    assert status["version"] == "gw-copy" and engine.draft_version == "gw-copy"
    broken = [h for h in status["history"] if h["version"] == "gw-broken"]
    assert broken and broken[-1]["ok"] is False and broken[-1]["reason"]
    assert status["last_error"]
    assert client.completions.create(model=model, prompt="still ok", max_tokens=4).choices[0].text is not None

    # admin: rollback to the previous version, promote by name (known path) and by path
    rb = admin(live, "POST", "/draft/rollback", json={})
    assert rb.status_code == 200 and rb.json()["version"] == "random" and engine.draft_version == "random"
    pr = admin(live, "POST", "/draft/promote", json={"version": "gw-copy"})
    assert pr.status_code == 200 and engine.draft_version == "gw-copy"
    pr = admin(live, "POST", "/draft/promote", json={"version": "gw-copy-2", "path": str(tiny.copy_draft)})
    assert pr.status_code == 200 and engine.draft_version == "gw-copy-2"
    assert_error(admin(live, "POST", "/draft/promote", json={"version": "gw-x", "path": "/nope"}), 422,
                 code="draft_swap_refused")
    assert_error(admin(live, "POST", "/draft/promote", json={"version": "never-seen"}), 404)
    assert engine.draft_version == "gw-copy-2"
    # a version only the worker's registry knows (<prefix>:drafts:versions)
    r.hset(f"{PREFIX}:drafts:versions", "gw-reg", json.dumps({"version": "gw-reg", "path": str(tiny.copy_draft)}))
    assert admin(live, "POST", "/draft/promote", json={"version": "gw-reg"}).status_code == 200
    assert engine.draft_version == "gw-reg"
    assert admin(live, "POST", "/draft/rollback", json={"version": "random"}).status_code == 200
    assert engine.draft_version == "random"
    r.close()


def test_admin_adaptation_and_capture(live, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    key = f"{PREFIX}:adaptation:paused"
    assert admin(live, "POST", "/adaptation/pause").json() == {"paused": True, "key": key}
    assert r.get(key) == b"1"
    assert admin(live, "GET", "/adaptation").json()["paused"] is True
    assert admin(live, "POST", "/adaptation/resume").json()["paused"] is False
    assert r.get(key) == b"0"
    r.close()
    got = admin(live, "PUT", "/capture", json={"sample_rate": 0.25})
    assert got.json() == {"enabled": True, "sample_rate": 0.25}
    assert admin(live, "PUT", "/capture", json={"enabled": False}).json() == {"enabled": False, "sample_rate": 0.25}
    assert_error(admin(live, "PUT", "/capture", json={"sample_rate": 2}), 400, param="sample_rate")
    assert admin(live, "PUT", "/capture", json={"enabled": True, "sample_rate": 1.0}).status_code == 200
