"""The openai engine against a small local HTTP server that checks what it is sent."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from densify.engines import create_engine
from densify.engines.base import EngineBatch, EngineError, PromptImage, Query, Sampling


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.fail_first = 0          # answer 500 to the first N chat requests
        self.fail_status = 500
        self.always_fail_text = "FAIL"  # queries whose text contains this always get 500
        self.bad_request_text = "BAD"   # ... or 400 (never retried)
        self.delay = 0.0
        self.slow_text = "SLOW"      # these sleep past the client's timeout
        self.slow_delay = 1.0
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.models = ["test-model"]
        self.dead = False
        self.server = None


def make_server(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                if state.models is None:
                    return self._send(401, {"error": {"message": "bad key"}})
                return self._send(200, {"object": "list", "data": [{"id": m} for m in state.models]})
            self._send(404, {"error": "no"})

        def do_POST(self):
            if state.dead:  # hang up without an answer (kept-alive connections outlive shutdown())
                self.close_connection = True
                return
            n = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(n))
            with state.lock:
                state.calls += 1
                call = state.calls
                state.bodies.append(body)
                state.headers.append({k.lower(): v for k, v in self.headers.items()})
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            try:
                text = body["messages"][-1]["content"]
                if isinstance(text, list):
                    text = text[-1]["text"]
                else:  # prefill: the user turn is the one before
                    text = body["messages"][-2]["content"][-1]["text"]
                if state.delay:
                    time.sleep(state.delay)
                if state.slow_text in text:
                    time.sleep(state.slow_delay)
                if call <= state.fail_first:
                    return self._send(state.fail_status, {"error": {"message": "overloaded"}})
                if state.always_fail_text in text:
                    return self._send(500, {"error": {"message": "internal error"}})
                if state.bad_request_text in text:
                    return self._send(400, {"error": {"message": "prompt too long"}})
                ans = f"<think> </think><answer>{len(text) % 10}.5</answer>"
                if body.get("continue_final_message"):
                    ans = f"{len(text) % 10}.5</answer>"
                resp = {"id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": ans},
                                     "finish_reason": "stop",
                                     "logprobs": {"content": [{"token": "a", "logprob": -0.5},
                                                              {"token": "b", "logprob": -0.25}]}
                                     if body.get("logprobs") else None}],
                        "usage": {"prompt_tokens": 800, "completion_tokens": 12, "total_tokens": 812,
                                  "prompt_tokens_details": {"cached_tokens": 752}}}
                self._send(200, resp)
            finally:
                with state.lock:
                    state.active -= 1

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    return srv


@pytest.fixture
def server():
    state = State()
    srv = state.server = make_server(state)
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", state
    finally:
        srv.shutdown()
        srv.server_close()


def batch(texts, sampling=None, n_images=1):
    rng = np.random.default_rng(0)
    imgs = {f"u{i}": PromptImage(f"u{i}", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for i in range(n_images)}
    uids = tuple(imgs)
    return EngineBatch(imgs, [Query(t, uids) for t in texts], sampling or Sampling(max_tokens=77))


def engine(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return create_engine("openai", profile="vlm3-depth", base_url=url, **kw)


def test_request_bodies_and_answers(server, monkeypatch):
    url, state = server
    monkeypatch.setenv("MY_TEST_KEY", "sekret-123")
    eng = engine(url, api_key_env="MY_TEST_KEY")
    assert eng.model == "test-model"  # the server's only model
    assert "sekret" not in repr(eng)
    b = batch(["q one", "q two"], n_images=2)
    outs = eng.generate(b)
    assert [o.text for o in outs] == ["<think> </think><answer>5.5</answer>"] * 2
    assert outs[0].n_prompt_tokens == 800 and outs[0].n_generated_tokens == 12
    assert outs[0].cached_prompt_tokens == 752 and outs[0].logprob is None and outs[0].error is None
    body = state.bodies[0]
    assert body["model"] == "test-model" and body["max_tokens"] == 77 and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["user"]
    content = body["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]  # images first, then text
    assert [c.get("uuid") for c in content[:2]] == ["u0", "u1"]
    assert content[2]["text"] in ("q one", "q two")
    url0 = content[0]["image_url"]["url"]
    assert url0.startswith("data:image/png;base64,")
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url0.split(",", 1)[1]))))
    np.testing.assert_array_equal(img, b.images["u0"].pixels)  # lossless
    assert state.headers[0]["authorization"] == "Bearer sekret-123"
    assert "structured_outputs" not in body and "logprobs" not in body
    eng.close()


def test_system_prompt_prefill_structured_logprobs(server, monkeypatch):
    url, state = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    eng = engine(url, model="test-model")
    s = Sampling(max_tokens=12, system_prompt="SYS", prefill="<think> </think><answer>",
                 structured_regex=r"[0-9]+\.[0-9]", logprobs=True)
    out = eng.generate(batch(["abc"], s))[0]
    assert out.text == "<think> </think><answer>3.5</answer>"
    assert out.logprob == pytest.approx(-0.75)
    body = state.bodies[0]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant"]
    assert body["messages"][0]["content"] == "SYS"
    assert body["messages"][2]["content"] == "<think> </think><answer>"
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["structured_outputs"] == {"regex": r"[0-9]+\.[0-9]"}
    assert body["logprobs"] is True
    assert "authorization" not in state.headers[0]
    eng.close()
    eng = engine(url, structured_field="guided_regex")
    eng.generate(batch(["abc"], s))
    assert state.bodies[-1]["guided_regex"] == r"[0-9]+\.[0-9]"
    eng.close()


def test_retries_on_500_then_succeeds(server):
    url, state = server
    state.fail_first = 3
    eng = engine(url, concurrency=1, retries=4)
    outs = eng.generate(batch(["a", "b"]))
    assert all(o.error is None and o.text for o in outs)
    assert state.calls == 5 and eng.stats["retries"] == 3
    eng.close()


def test_retries_on_429(server):
    url, state = server
    state.fail_first, state.fail_status = 2, 429
    eng = engine(url, concurrency=1)
    assert eng.generate(batch(["a"]))[0].error is None
    assert state.calls == 3
    eng.close()


def test_per_query_failure_records(server):
    url, state = server
    eng = engine(url, concurrency=4, retries=2)
    outs = eng.generate(batch(["ok 1", "FAIL me", "ok 2", "BAD one"]))
    assert outs[0].error is None and outs[2].error is None
    assert outs[1].text == "" and "HTTP 500" in outs[1].error and "3 attempts" in outs[1].error
    assert "HTTP 400" in outs[3].error and "prompt too long" in outs[3].error
    # 500 retried (3 calls), 400 not retried (1 call), plus two good ones
    assert state.calls == 3 + 1 + 2
    eng.close()


def test_timeout_is_retried_then_recorded(server):
    url, state = server
    state.slow_delay = 0.6
    eng = engine(url, timeout_s=0.2, retries=1, concurrency=2)
    outs = eng.generate(batch(["SLOW", "fast"]))
    assert outs[1].error is None
    assert "timed out" in outs[0].error and "2 attempts" in outs[0].error
    eng.close()


def test_concurrency_is_bounded(server):
    url, state = server
    state.delay = 0.05
    eng = engine(url, concurrency=3)
    outs = eng.generate(batch([f"q{i}" for i in range(24)]))
    assert all(o.error is None for o in outs)
    assert state.max_active == 3
    eng.close()


def test_stream_keeps_order(server):
    url, state = server
    eng = engine(url, concurrency=4, batches_in_flight=2)
    bs = [batch([f"b{j} q{i}" for i in range(5)]) for j in range(4)]
    for j, b in enumerate(bs):
        b.tag = j
    got = [(b.tag, len(o)) for b, o in eng.stream(bs)]
    assert got == [(0, 5), (1, 5), (2, 5), (3, 5)]
    eng.close()


def test_unreachable_server_is_engine_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(EngineError, match=rf"127.0.0.1:{port}/v1/models.*vllm serve"):
        engine(f"http://127.0.0.1:{port}/v1")


def test_bad_key_and_unknown_model(server):
    url, state = server
    with pytest.raises(EngineError, match="does not serve 'other'"):
        engine(url, model="other")
    state.models = None
    with pytest.raises(EngineError, match="OPENAI_API_KEY"):
        engine(url)


def test_server_dying_mid_run_gives_failure_records(server):
    url, state = server
    eng = engine(url, retries=1, concurrency=2)
    assert eng.generate(batch(["a"]))[0].error is None
    # stop the server: every query fails with a connection error, no exception for the batch
    state.dead = True
    state.server.shutdown()
    state.server.server_close()
    outs = eng.generate(batch(["a", "b"]))
    assert all(o.error and "connection error" in o.error for o in outs)
    eng.close()


def test_stream_source_may_yield_none(server):
    """None from the source ("nothing new yet") hands back finished batches without blocking; order kept,
    every batch answered, and Nones with nothing held do not end the stream."""
    url, state = server
    state.delay = 0.02
    eng = engine(url, concurrency=4, batches_in_flight=3)
    bs = [batch([f"b{j} q{i}" for i in range(4)]) for j in range(4)]
    for j, b in enumerate(bs):
        b.tag = j
    got = []

    def source():
        yield None
        for b in bs:
            yield b
            for _ in range(3):
                yield None
        while len(got) < len(bs):  # everything held is handed back on Nones alone
            yield None
        yield None

    for b, outs in eng.stream(source()):
        assert len(outs) == 4 and all(o.error is None and o.text for o in outs)
        got.append(b.tag)
    assert got == [0, 1, 2, 3]
    eng.close()


def test_key_only_from_the_named_variable(server, monkeypatch):
    """The SDK would read OPENAI_API_KEY, OPENAI_ORG_ID and OPENAI_PROJECT_ID by itself: none is used."""
    url, state = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-be-sent-1234")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-nope")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-nope")
    monkeypatch.delenv("OTHER_KEY_VAR", raising=False)
    eng = engine(url, api_key_env="OTHER_KEY_VAR")
    assert eng.generate(batch(["a"]))[0].error is None
    sent = state.headers[-1]
    assert "authorization" not in sent and "openai-organization" not in sent and "openai-project" not in sent
    eng.close()
