"""The OpenAI-compatible server, through real clients: the openai package and raw HTTP (httpx).

One server for the session (``served_demo`` in conftest.py: the demo model in float64).
Expected numbers come from a separate ``Llama2`` of the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import SERVER_KEY  # noqa: E402

from llama2np import Llama2  # noqa: E402
from llama2np.generation.sampling import log_softmax  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference() -> Llama2:
    return Llama2.from_pretrained(REPO / "weights" / "demo", dtype="float64")


@pytest.fixture(scope="module")
def client(served_demo):
    return openai.OpenAI(base_url=f"{served_demo}/v1", api_key=SERVER_KEY, max_retries=0)


def _logprobs(model: Llama2, ids: list[int]) -> np.ndarray:
    return log_softmax(model.logits(ids, reuse_cache=False))  # (seq, vocab)


def test_models_lists_the_served_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_echo_logprobs_are_log_softmax_of_the_engine_logits(client, reference):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=3)
    choice = r.choices[0]
    new = reference.generate(PROMPT, max_new_tokens=6, temperature=0, logprobs=True)
    ids = reference.tokenizer.encode(PROMPT) + new.ids
    lp = _logprobs(reference, ids)
    got = choice.logprobs
    assert choice.text == PROMPT + new.text
    assert len(got.tokens) == len(ids) and got.token_logprobs[0] is None and got.top_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1:], lp[np.arange(len(ids) - 1), ids[1:]], rtol=0, atol=1e-6)
    for i in range(1, len(ids)):  # the top 3 alternatives are the 3 largest log-probabilities, likeliest first
        np.testing.assert_allclose(list(got.top_logprobs[i].values()), np.sort(lp[i - 1])[::-1][:3], atol=1e-6)
    # greedy: each new token is the likeliest
    assert all(got.token_logprobs[i] == max(got.top_logprobs[i].values()) for i in range(len(ids) - 6, len(ids)))
    for token, offset in zip(got.tokens[2:], got.text_offset[2:]):  # offsets point at each token's text
        assert choice.text[offset:].startswith(token)
    assert r.usage.prompt_tokens == len(ids) - 6 and r.usage.completion_tokens == 6


def test_prompt_forms_give_the_same_answers(client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    other = reference.tokenizer.encode("The little dog")
    kw = dict(model="demo", max_tokens=5, temperature=0.8, seed=7, logprobs=1)
    text = client.completions.create(prompt=[PROMPT, "The little dog"], **kw)
    tokens = client.completions.create(prompt=[ids, other], **kw)
    single = client.completions.create(prompt=ids, **kw)
    assert [c.text for c in text.choices] == [c.text for c in tokens.choices]
    for a, b in zip(text.choices, tokens.choices):  # the kept KV cache may differ in the last bits
        np.testing.assert_allclose(a.logprobs.token_logprobs, b.logprobs.token_logprobs, rtol=0, atol=1e-9)
    assert single.choices[0].text == text.choices[0].text  # prompt i samples with seed + i
    echo0 = client.completions.create(model="demo", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    lp = _logprobs(reference, ids)
    np.testing.assert_allclose(echo0.choices[0].logprobs.token_logprobs[1:], lp[np.arange(len(ids) - 1), ids[1:]],
                               atol=1e-6)
    assert echo0.usage.completion_tokens == 0 and echo0.choices[0].text == PROMPT


def test_sampling_options_reach_the_engine(client, reference):
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=3, min_p=0.01,
              repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={13: -100.0})
    want = reference.generate(PROMPT, **kw)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95, seed=3,
                                  presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"13": -100},
                                  extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2})
    assert r.choices[0].text == want


def test_stop_strings_and_finish_reasons(client, reference):
    full = reference.generate(PROMPT, max_new_tokens=30, temperature=0)
    stop = full.split()[3]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_streamed_completion_is_the_whole_one_in_pieces_ending_in_done(served_demo, client):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served_demo}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {SERVER_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens


def test_streaming_chat_in_metas_format(client, reference):
    messages = [{"role": "system", "content": "Tell short stories."}, {"role": "user", "content": "A story?"}]
    want = reference.chat(messages, max_new_tokens=25, temperature=0)
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=25, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_are_the_engine_logits(client, reference):
    messages = [{"role": "user", "content": "Tell me about a cat."}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    from llama2np.generation.chat import dialog_tokens

    prompt = dialog_tokens(reference.tokenizer, messages)
    new = reference.generate(prompt, max_new_tokens=8, temperature=0)
    lp = _logprobs(reference, prompt + new)
    positions = np.arange(len(prompt) - 1, len(prompt) + len(new) - 1)
    np.testing.assert_allclose([t.logprob for t in content], lp[positions, new], atol=1e-6)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert r.choices[0].message.content == reference.chat(messages, max_new_tokens=8, temperature=0)


def test_eight_concurrent_clients_get_their_one_by_one_answers(client):
    prompts = [f"{PROMPT} there was a {w}" for w in ("cat", "dog", "bird", "king", "girl", "tree", "boat", "frog")]

    def ask(i: int):
        r = client.completions.create(model="demo", prompt=prompts[i], max_tokens=24, temperature=0.0 if i % 2 else 1.0,
                                      seed=i, logprobs=1)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert [t for t, _ in together] == [t for t, _ in alone]
    for (_, a), (_, b) in zip(alone, together):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def _raw(served_demo, path: str, body, key: str | None = SERVER_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{served_demo}{path}", content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(f"{served_demo}{path}", json=body, headers=headers)


@pytest.mark.parametrize("body, status, says", [
    ({"model": "demo", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": "demo", "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"model": "demo", "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "demo", "prompt": [1, 5000]}, 400, "outside the vocabulary"),
    ({"model": "demo", "prompt": [1] * 600}, 400, "context length"),
    ({"model": "demo", "prompt": "once " * 600}, 400, "longer than the context length"),
    ({"model": "demo", "prompt": PROMPT, "logprobs": 99}, 400, "logprobs"),
    ({"model": "demo", "prompt": PROMPT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "demo", "prompt": PROMPT, "n": 2}, 400, "n must be 1"),
    ({"model": "demo"}, 400, "prompt"),
    (b"{not json", 400, "not valid JSON"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "gpt-4"),
])
def test_a_bad_request_gets_an_openai_error_and_the_next_one_works(served_demo, client, body, status, says):
    r = _raw(served_demo, "/v1/completions", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"]
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_bad_chat_requests(served_demo):
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    r = _raw(served_demo, "/v1/chat/completions", {"model": "demo", "messages": bad})
    assert r.status_code == 400 and "alternating" in r.json()["error"]["message"]
    long = [{"role": "user", "content": "word " * 600}]
    r = _raw(served_demo, "/v1/chat/completions", {"model": "demo", "messages": long})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_a_wrong_or_missing_key_gets_401_and_unknown_routes_404(served_demo):
    for key in ("wrong", None):
        r = _raw(served_demo, "/v1/completions", {"model": "demo", "prompt": PROMPT}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served_demo}/v1/models").status_code == 401
    r = httpx.get(f"{served_demo}/v1/engines", headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def _worker_events(job, loop, until):
    """Run ``loop`` until ``until(event)`` is true for an event of ``job``; that event."""
    async def wait():
        while True:
            event = await job.events.get()
            if until(event):
                return event
    return loop.run_until_complete(asyncio.wait_for(wait(), 30))


def test_a_client_that_goes_away_stops_its_work_and_the_server_goes_on(served_demo, client, reference):
    from llama2np.server.engine import Prompt, generation_config
    from llama2np.server.responses import CompletionWork
    from llama2np.server.worker import Job, Worker

    # the engine side: cancelled after its first piece, the request leaves the decode loop at the next step
    config = generation_config(400, 0.0, 1.0, None, 0.0, 1.0, 0.0, 0.0, {2: -np.inf}, None, [], 1024)  # no EOS
    loop = asyncio.new_event_loop()
    worker = Worker(reference, max_queue=4)
    try:
        job = Job(CompletionWork([Prompt(reference.tokenizer.encode(PROMPT), PROMPT)], config, 400), loop)
        worker.submit(job)
        _worker_events(job, loop, lambda e: e[0] == "piece")
        job.cancel()
        deadline = time.monotonic() + 30
        while (worker.busy or not job.requests[0].done) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.requests[0].finish_reason == "cancelled" and len(job.requests[0].new_ids) < 400
    finally:
        worker.stop()
        loop.close()
    # the HTTP side: a stream dropped after its first chunk
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 400, "stream": True, "logit_bias": {"2": -100}}
    with httpx.stream("POST", f"{served_demo}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {SERVER_KEY}"}) as r:
        next(r.iter_lines())
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_refuses_at_once(reference):
    from llama2np.server.worker import Job, QueueFull, Worker

    release = threading.Event()

    class Blocking:
        def start(self, engine, emit):
            release.wait(10)
            return []

    loop = asyncio.new_event_loop()
    worker = Worker(reference, max_queue=1)
    try:
        worker.submit(Job(Blocking(), loop))  # taken by the engine thread, which it blocks
        while worker.queue.qsize():
            time.sleep(0.01)
        worker.submit(Job(Blocking(), loop))  # waits
        with pytest.raises(QueueFull, match="queue is full"):
            worker.submit(Job(Blocking(), loop))
    finally:
        release.set()
        worker.stop()
        loop.close()


def test_tokenize_endpoints_for_lm_eval(served_demo, reference):
    auth = {"Authorization": f"Bearer {SERVER_KEY}"}
    info = httpx.get(f"{served_demo}/tokenizer_info", headers=auth).json()
    assert (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    tok = httpx.post(f"{served_demo}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}, headers=auth)
    assert tok.json()["tokens"] == reference.tokenizer.encode(PROMPT, bos=False)
    assert httpx.post(f"{served_demo}/tokenize", json={"prompt": "</s>"}, headers=auth).json()["tokens"] == [2]
    text = httpx.post(f"{served_demo}/detokenize", json={"tokens": tok.json()["tokens"]}, headers=auth).json()
    assert text["prompt"] == PROMPT


def test_serve_command_listens_on_localhost_and_answers(tmp_path):
    pytest.importorskip("uvicorn")
    proc = subprocess.Popen([sys.executable, "-m", "llama2np", "serve", "--model", str(REPO / "weights" / "demo"),
                             "--port", "0"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stderr.readline()
        assert "serving demo" in line and "http://127.0.0.1:" in line, line
        url = line.split("on ", 1)[1].split("/v1")[0]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "demo"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_command_bad_flags_are_one_line_errors():
    r = subprocess.run([sys.executable, "-m", "llama2np", "serve", "--model", str(REPO / "weights" / "demo"),
                        "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--port" in r.stderr
