"""The openai engine against a hostile local server (127.0.0.1 only): trickled bodies and headers, error
bodies that echo the API key, answers that are not text, refused keys, dead ports, a server that never
answers while the job is interrupted. Every case is bounded in time: a hang is a failure, not a stuck run."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from densify.engines import EngineStartError, create_engine
from densify.engines.base import EngineBatch, EngineError, PromptImage, Query, Sampling
from densify.engines.store import AnswerStore, StoredEngine

KEY = "sk-test-SEKRET0123456789abcdef"
KEY_ENV = "DENSIFY_ADVERSARIAL_KEY"


class Hostile:
    """What the server does is chosen by the query text (chat) or `models` (GET /v1/models)."""

    def __init__(self):
        self.models = "ok"
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()  # releases handlers that wait "forever"


def _serve(h: Hostile):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, payload, headers=()):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _trickle_body(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not h.stop.is_set():  # one byte every 20 ms: each read is quick, the whole never ends
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                h.stop.wait(0.02)

        def _trickle_headers(self):
            for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 100000:
                if h.stop.is_set():
                    return
                try:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                except OSError:
                    return
                h.stop.wait(0.02)

        def do_GET(self):
            mode = h.models
            if mode == "ok":
                return self._send(200, {"object": "list", "data": [{"id": "m"}]})
            if mode == "401echo":
                auth = self.headers.get("Authorization", "")
                return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]} "
                                                             f"(header was {auth!r})"}})
            if mode == "trickle":
                return self._trickle_body()
            if mode == "trickle_headers":
                return self._trickle_headers()
            self._send(404, {"error": "no"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(n))
            text = body["messages"][-1]["content"][-1]["text"]
            with h.lock:
                call = h.calls[text] = h.calls.get(text, 0) + 1
            auth = self.headers.get("Authorization", "")

            def answer(content):
                return self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                     "finish_reason": "stop"}],
                                        "usage": {"prompt_tokens": 10, "completion_tokens": 2}})

            if text == "TRICKLE":
                return self._trickle_body()
            if text == "TRICKLE_HEADERS":
                return self._trickle_headers()
            if text == "HANG":
                h.stop.wait(30)
                return
            if text == "ECHO400":
                return self._send(400, {"error": {"message": f"bad request from key {auth[7:]}; "
                                                             f"Authorization: {auth}; api_key={auth[7:]}"}})
            if text == "ECHO500":
                return self._send(500, {"error": {"message": f"upstream said {auth}"}})
            if text == "ECHO_NOT_JSON":
                return self._send(200, f"<html>proxy error for {auth}</html>".encode())
            if text == "NUMBER":
                return answer(3.5)
            if text == "OBJECT":
                return answer({"depth": 3.5})
            if text == "NULL":
                return answer(None)
            if text == "E500_THEN_OK" and call == 1:
                return self._send(500, {"error": {"message": "overloaded"}})
            if text == "BACKOFF":
                return self._send(503, {"error": {"message": "loading"}}, [("Retry-After", "3600")])
            return answer("<answer>2.5</answer>")

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture
def hostile(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    h = Hostile()
    srv = _serve(h)
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", h
    finally:
        h.stop.set()
        srv.shutdown()
        srv.server_close()


def make(url, **kw):
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("timeout_s", 0.5)
    kw.setdefault("connect_timeout_s", 0.5)
    kw.setdefault("retries", 0)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return create_engine("openai", profile="vlm3-depth", base_url=url, **kw)


def batch(*texts):
    img = PromptImage("u0", np.zeros((8, 8, 3), np.uint8))
    return EngineBatch({"u0": img}, [Query(t, ("u0",)) for t in texts], Sampling(max_tokens=8))


def bounded(fn, seconds: float):
    """fn() in a thread; fails the test if it has not returned after `seconds` (instead of hanging)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"still running after {seconds} s"
    out["elapsed"] = time.monotonic() - t0
    return out


# -- deadlines

@pytest.mark.parametrize("mode", ["TRICKLE", "TRICKLE_HEADERS"])
def test_trickled_answer_hits_the_overall_deadline(hostile, mode):
    url, _ = hostile
    eng = make(url, timeout_s=0.6)
    res = bounded(lambda: eng.generate(batch(mode, "fine")), 5)
    outs = res["value"]
    assert outs[0].text == "" and "timed out" in outs[0].error
    assert outs[1].error is None and outs[1].text == "<answer>2.5</answer>"
    assert res["elapsed"] < 3
    eng.close()


@pytest.mark.parametrize("mode", ["trickle", "trickle_headers"])
def test_slow_start_is_a_start_error_within_the_deadline(hostile, mode):
    url, h = hostile
    h.models = mode
    res = bounded(lambda: make(url, timeout_s=0.6), 5)
    assert isinstance(res.get("error"), EngineStartError), res
    assert "did not answer within timeout_s" in str(res["error"])


# -- start-up failures

def test_refused_key_is_a_start_error_without_the_key(hostile):
    url, h = hostile
    h.models = "401echo"
    with pytest.raises(EngineStartError) as info:
        make(url)
    msg = str(info.value)
    assert KEY_ENV in msg and "refused the API key" in msg and KEY not in msg
    assert isinstance(info.value, EngineError)  # callers catching EngineError still catch it


def test_unreachable_port_is_a_start_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = bounded(lambda: make(f"http://127.0.0.1:{port}/v1", retries=5), 5)
    assert isinstance(res.get("error"), EngineStartError)
    assert "vllm serve" in str(res["error"]) and "base_url" in str(res["error"])


def test_a_password_in_base_url_stays_out_of_messages_and_repr():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(EngineStartError) as info:
        make(f"http://bob:pw-SEKRET-9@127.0.0.1:{port}/v1")
    assert "SEKRET" not in str(info.value) and "[redacted]" in str(info.value)


def test_model_not_served_is_a_start_error(hostile):
    url, _ = hostile
    with pytest.raises(EngineStartError, match="does not serve 'other'"):
        make(url, model="other")


# -- the key never leaves the process

@pytest.mark.parametrize("mode", ["ECHO400", "ECHO500", "ECHO_NOT_JSON"])
def test_error_bodies_echoing_the_key_are_redacted(hostile, mode, caplog):
    url, _ = hostile
    caplog.set_level(logging.DEBUG)
    eng = make(url, retries=1)
    out = eng.generate(batch(mode))[0]
    assert out.text == "" and out.error
    assert KEY not in out.error and "SEKRET" not in out.error
    assert "[redacted]" in out.error
    assert KEY not in caplog.text and "SEKRET" not in caplog.text
    assert KEY not in repr(eng)
    eng.close()


def test_redact_removes_credentials_and_keeps_ordinary_text():
    from densify.io.redact import redact

    text = (f"key {KEY} / Authorization: Bearer abc.DEF-123_xyz / x-api-key: hunter22 / "
            f'{{"api_key": "zzzz9999"}} / password=pa55word / sk-proj-ABCDEFGH12345678')
    out = redact(text, [KEY])
    for secret in (KEY, "abc.DEF-123_xyz", "hunter22", "zzzz9999", "pa55word", "sk-proj-ABCDEFGH12345678"):
        assert secret not in out
    assert out.count("[redacted]") == 6
    assert redact("http://bob:s3cr3t-pw@host:8000/v1") == "http://bob:[redacted]@host:8000/v1"
    ordinary = "Unexpected token in JSON at position 4; max_tokens 77 exceeds the 8192 tokens of the model"
    assert redact(ordinary) == ordinary
    assert len(redact("x" * 10_000)) < 600


# -- only text answers

@pytest.mark.parametrize("mode", ["NUMBER", "OBJECT", "NULL"])
def test_non_text_answers_are_errors_and_never_stored(hostile, mode, tmp_path):
    url, _ = hostile
    store = AnswerStore(tmp_path / "answers-0.sqlite")
    eng = StoredEngine(make(url), store, "k", profile="vlm3-depth")
    outs = eng.generate(batch(mode, "fine"))
    assert outs[0].text == "" and "not text" in outs[0].error
    assert outs[1].error is None
    assert len(store) == 1  # only the good answer
    eng.close()
    store.close()


# -- retries

def test_500_then_ok_is_answered_after_one_retry(hostile):
    url, h = hostile
    eng = make(url, retries=2)
    out = eng.generate(batch("E500_THEN_OK"))[0]
    assert out.error is None and out.text == "<answer>2.5</answer>"
    assert h.calls["E500_THEN_OK"] == 2 and eng.stats["retries"] == 1
    eng.close()


# -- interruption

def test_close_does_not_wait_out_an_in_flight_timeout(hostile):
    url, _ = hostile
    eng = make(url, timeout_s=30, retries=3)
    res: dict = {}
    th = threading.Thread(target=lambda: res.setdefault("r", bounded(lambda: eng.generate(batch("HANG", "HANG")), 8)))
    th.start()
    time.sleep(0.3)  # the requests are in flight now
    t0 = time.monotonic()
    closed = bounded(eng.close, 3)
    th.join(8)
    assert closed["elapsed"] < 1.5
    r = res["r"]
    assert time.monotonic() - t0 < 3
    # the batch ends at once: either with error records or an EngineError saying the engine was closed
    if "error" in r:
        assert isinstance(r["error"], EngineError)
    else:
        assert all(o.error for o in r["value"])


def test_close_interrupts_a_retry_backoff(hostile):
    url, h = hostile
    eng = make(url, retries=5, backoff_s=20, max_backoff_s=60)  # Retry-After: 3600 asks for an hour
    res: dict = {}
    th = threading.Thread(target=lambda: res.setdefault("r", bounded(lambda: eng.generate(batch("BACKOFF")), 8)))
    th.start()
    deadline = time.monotonic() + 3
    while h.calls.get("BACKOFF", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # now waiting in the backoff
    t0 = time.monotonic()
    eng.close()
    th.join(8)
    assert time.monotonic() - t0 < 2
    r = res["r"]
    assert ("error" in r and isinstance(r["error"], EngineError)) or "closed" in r["value"][0].error
    assert h.calls["BACKOFF"] == 1


def test_close_ends_a_stream_with_batches_in_flight(hostile):
    url, _ = hostile
    eng = make(url, timeout_s=30, retries=3, batches_in_flight=3)
    batches = [batch("fine"), batch("HANG", "fine"), batch("HANG")]
    got: list = []

    def consume():
        for b, outs in eng.stream(iter(batches)):
            got.append([o.error for o in outs])

    th = threading.Thread(target=lambda: got.append(_bounded_result(consume)), daemon=True)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    bounded(eng.close, 3)
    th.join(5)
    assert not th.is_alive() and time.monotonic() - t0 < 3
    assert got[0] == [None]  # the batch answered before the close is handed back
    # the rest ends at once: error records for the hung queries ("fine" may have been answered), or an
    # EngineError for queries the close cancelled before they started
    end = got.pop()
    assert end is None or isinstance(end, EngineError)
    hung = [errs[0] for errs in got[1:]]
    assert all(e and "closed" in e for e in hung), got


def _bounded_result(fn):
    try:
        fn()
    except BaseException as exc:
        return exc
    return None
