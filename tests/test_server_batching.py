"""The server's continuous batching: requests that start while others run join their batch.

A request added between two steps is prefilled, then decodes in the same forward pass as
every running request; it gets the answer it gets alone, and a request whose client went
away leaves the batch at the next step. Checked on the engine object (exact step counts
from ``Decoder.stats``) and through the session's server (its ``/health`` counts), and the
queue's 429 through the app itself (no second server).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import SERVER_KEY  # noqa: E402

from llama2np import Llama2  # noqa: E402
from llama2np.server.engine import Engine, Prompt, generation_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}
NO_EOS = {2: -np.inf}  # every request makes all the tokens it asks for


@pytest.fixture(scope="module")
def reference() -> Llama2:
    return Llama2.from_pretrained(REPO / "weights" / "demo", dtype="float64")


def _config(model: Llama2, max_tokens: int, temperature: float = 0.0, seed: int | None = None):
    return generation_config(max_tokens, temperature, 1.0, None, 0.0, 1.0, 0.0, 0.0, NO_EOS, seed, [],
                             model.args.vocab_size)


def _alone(model: Llama2, prompt: str, config) -> list[int]:
    return model.generate(model.tokenizer.encode(prompt), config=config).ids


def test_a_request_joining_mid_generation_shares_the_steps_and_gets_its_alone_answer(reference):
    first, second = _config(reference, 60), _config(reference, 20, temperature=0.8, seed=3)
    engine = Engine(reference)
    a = engine.request(Prompt(reference.tokenizer.encode("Once upon a time")), first)
    engine.add([a])
    for _ in range(10):
        engine.step()
    b = engine.request(Prompt(reference.tokenizer.encode("The dog")), second)
    engine.add([b])  # joins between two steps
    while engine.running:
        engine.step()
    assert len(a.new_ids) == 60 and len(b.new_ids) == 20
    # one forward per step for both: a's 60 (its prefill and 59 steps) + b's prefill; alone it would be 80
    assert engine.stats.forward_passes == 61 and engine.stats.new_tokens == 80
    assert a.new_ids == _alone(reference, "Once upon a time", first)
    want = reference.generate(reference.tokenizer.encode("The dog"), config=second)
    assert b.new_ids == want.ids
    np.testing.assert_allclose(b.logprobs, want.logprobs, rtol=0, atol=1e-9)


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(reference):
    engine = Engine(reference)
    a = engine.request(Prompt(reference.tokenizer.encode("Once upon a time")), _config(reference, 40))
    b = engine.request(Prompt(reference.tokenizer.encode("The dog")), _config(reference, 40))
    engine.add([a, b])
    for _ in range(5):
        engine.step()
    assert len(a.new_ids) == len(b.new_ids) == 5
    b.cancel()  # its client went away
    made, passes = engine.stats.new_tokens, engine.stats.forward_passes
    moved = engine.step()
    assert [r for r, _ in moved] == [a] and len(b.new_ids) == 5 and b.finish_reason == "cancelled"
    assert engine.stats.new_tokens == made + 1 and engine.stats.forward_passes == passes + 1
    while engine.running:
        engine.step()
    assert a.new_ids == _alone(reference, "Once upon a time", _config(reference, 40))


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def _idle(url: str) -> dict:
    deadline = time.monotonic() + 30
    while (h := _health(url))["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return h


def _texts(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_a_client_starting_during_a_stream_joins_its_batch_through_the_server(served_demo, reference):
    long = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True,
            "logit_bias": {"2": -100}}
    short = {"model": "demo", "prompt": "The dog", "max_tokens": 10, "temperature": 0.8, "seed": 5,
             "logit_bias": {"2": -100}}
    before = _idle(served_demo)
    with httpx.stream("POST", f"{served_demo}/v1/completions", json=long, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        chunks = [json.loads(next(lines)[6:])]  # the long one is running
        joined = httpx.post(f"{served_demo}/v1/completions", json=short, headers=AUTH, timeout=60).json()
        chunks += [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    after = _idle(served_demo)
    bias = {2: -100.0}
    assert joined["choices"][0]["text"] == reference.generate("The dog", max_new_tokens=10, temperature=0.8,
                                                              top_p=1.0, seed=5, logit_bias=bias)
    assert _texts(chunks) == reference.generate("Once upon a time", max_new_tokens=400, temperature=0,
                                                logit_bias=bias)
    # 410 tokens in 401 forward passes: the short one's prefill, then it rode along the long one's steps
    assert after["new_tokens"] - before["new_tokens"] == 410
    assert after["forward_passes"] - before["forward_passes"] == 401


def test_a_dropped_stream_or_connection_stops_its_work(served_demo):
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "logit_bias": {"2": -100}}
    before = _idle(served_demo)
    with httpx.stream("POST", f"{served_demo}/v1/completions", json=body, headers=AUTH) as r:
        next(r.iter_lines())
    after = _idle(served_demo)
    assert after["running"] == 0 and after["new_tokens"] - before["new_tokens"] < 400
    # not streamed: the server sees the connection close while the request runs (8 rows of ~500 tokens)
    body = {"model": "demo", "prompt": ["Once upon a time"] * 8, "max_tokens": None, "logit_bias": {"2": -100}}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{served_demo}/v1/completions", json=body, headers=AUTH, timeout=0.3)
    later = _idle(served_demo)
    assert later["running"] == 0 and later["new_tokens"] - after["new_tokens"] < 8 * 500
    r = httpx.post(f"{served_demo}/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 3},
                   headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_gets_429_in_openais_form_and_then_service_resumes(reference):
    from llama2np.server.app import create_app
    from llama2np.server.worker import Job

    app = create_app(reference, "demo", max_queue=1)
    release = threading.Event()

    class Blocking:
        def start(self, engine, emit):
            release.wait(20)
            return []

    async def run():
        async with app.router.lifespan_context(app):
            worker = app.state.worker
            loop = asyncio.get_running_loop()
            worker.submit(Job(Blocking(), loop))  # the engine thread takes it and blocks
            while worker.queue.qsize():
                await asyncio.sleep(0.01)
            worker.submit(Job(Blocking(), loop))  # fills the queue
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 2}
                full = await client.post("/v1/completions", json=body)
                release.set()
                then = await client.post("/v1/completions", json=body)
                return full, then

    full, then = asyncio.run(run())
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "queue is full" in error["message"]
    assert then.status_code == 200 and then.json()["usage"]["completion_tokens"] == 2


def test_chat_unknown_model_and_streamed_chat_logprobs(served_demo):
    messages = [{"role": "user", "content": "Tell me about a cat."}]
    r = httpx.post(f"{served_demo}/v1/chat/completions", json={"model": "gpt-4", "messages": messages}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    body = {"model": "demo", "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = httpx.post(f"{served_demo}/v1/chat/completions", json=body, headers=AUTH).json()
    with httpx.stream("POST", f"{served_demo}/v1/chat/completions", json={**body, "stream": True},
                      headers=AUTH) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    ends = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert ends and ends[-1]["choices"][0]["logprobs"] is not None
    streamed, want = ends[-1]["choices"][0]["logprobs"]["content"], whole["choices"][0]["logprobs"]["content"]
    assert len(want) == whole["usage"]["completion_tokens"] and len(streamed) == len(want)
    for s, w in zip(streamed, want):  # the same tokens, log-probabilities and alternatives
        assert [s["token"]] + [t["token"] for t in s["top_logprobs"]] == \
            [w["token"]] + [t["token"] for t in w["top_logprobs"]]
        np.testing.assert_allclose([s["logprob"]] + [t["logprob"] for t in s["top_logprobs"]],
                                   [w["logprob"]] + [t["logprob"] for t in w["top_logprobs"]], rtol=0, atol=1e-9)


def test_a_cancelled_job_ends_its_waiting_handler(reference):
    from llama2np.server.responses import CompletionWork
    from llama2np.server.worker import Job, Worker

    loop = asyncio.new_event_loop()
    worker = Worker(reference, max_queue=4)
    try:
        prompt = Prompt(reference.tokenizer.encode("Once upon a time"), "Once upon a time")
        waiting = Job(CompletionWork([prompt], _config(reference, 400), 400), loop)
        waiting.cancel()  # gone before the engine thread took it
        running = Job(CompletionWork([prompt], _config(reference, 400), 400), loop)
        worker.submit(waiting)
        worker.submit(running)

        async def last(job):
            while True:
                event = await job.events.get()
                if event[0] != "piece":
                    return event
                job.cancel()  # gone while it runs

        assert loop.run_until_complete(asyncio.wait_for(last(waiting), 30)) == ("cancelled",)
        assert loop.run_until_complete(asyncio.wait_for(last(running), 30)) == ("cancelled",)
        assert running.requests[0].finish_reason == "cancelled"
    finally:
        worker.stop()
        loop.close()
