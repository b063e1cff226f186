"""The `openai` engine: an already running OpenAI-compatible chat server (e.g. `vllm serve MODEL`).

Each query is one `POST {base_url}/chat/completions` through the official `openai` SDK: an optional system
message, then one user message whose content is the image(s) as base64 PNG data URLs (`image_url` parts,
each with the image's uid as vLLM's `uuid`, so the server's caches key on it), then the text. Greedy
(`temperature` 0), `max_tokens` from the batch. A prefill goes in as a final assistant message with
`continue_final_message` (vLLM renders it right after the generation prompt, as the hf engine does) and is
put back at the start of the answer. Structured output sends the profile's regex as
`structured_outputs: {"regex": ...}` (vLLM >= 0.11; set `structured_field="guided_regex"` for older servers).

Requests run on a bounded thread pool (`concurrency`) sharing one keep-alive HTTP client. Every attempt has
one wall-clock deadline (`timeout_s`: connect, send and the whole answer; a server that trickles its body
byte by byte is cut off there), enforced at the socket layer, since the SDK's timeouts are per socket read.
Retries (`retries`, exponential backoff with jitter) are done here rather than in the SDK, whose retry
sleeps cannot be interrupted: `close()` (Ctrl-C) cancels queued queries, wakes every backoff wait and
shuts down every open socket, so it never waits out a timeout. A query that still fails gets a
`Completion(error=...)`; only a well-formed string answer becomes a Completion text. Server text is
redacted of the key (and of anything credential-like) before it is logged or stored. Start-up failures
(unreachable server, refused key, model not served, no `openai` package) raise `EngineStartError`.
The API key is read only from the environment variable named by `api_key_env`; no other environment
variable (OPENAI_API_KEY, OPENAI_ORG_ID, proxies) is used.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import importlib
import io
import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.parse
import weakref
from typing import Any, Iterable, Iterator

from densify.config.profiles import Profile, load_profile
from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, EngineStartError, PromptImage, Query,
                                  check_batch)
from densify.engines.chat import chat_messages
from densify.engines.options import OpenAIOptions
from densify.io.redact import redact

log = logging.getLogger(__name__)
for _name in ("httpx", "httpx2"):  # they log every request at INFO: thousands of lines per image
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Request fields the SDK's `create` takes by name; everything else (vLLM extensions) goes in extra_body.
_SDK_FIELDS = ("model", "messages", "max_tokens", "temperature", "n", "stream", "logprobs", "top_logprobs", "stop")


def _sdk():
    """(openai, its HTTP client module, that module's transport core): httpx/httpcore or httpx2/httpcore2."""
    try:
        import openai
    except ImportError:
        raise EngineStartError("the openai engine needs the `openai` package: pip install 'densify[openai]' "
                               "(or pip install openai)") from None
    for http_name, core_name in (("httpx2", "httpcore2"), ("httpx", "httpcore")):  # what the SDK is built on
        try:
            http = importlib.import_module(http_name)
        except ImportError:
            continue
        if openai.Timeout is http.Timeout:
            return openai, http, importlib.import_module(core_name)
    raise EngineStartError(f"the openai engine does not know the HTTP client of openai {openai.__version__}; "
                           f"install a supported version: pip install 'densify[openai]'")


def _deadline_backend(core):
    """A network backend for the SDK's HTTP client whose sockets obey a per-thread wall-clock deadline
    (each read, write and connect waits at most until it) and can all be shut down at once (`abort`)."""

    class Stream(core.NetworkStream):
        def __init__(self, inner, owner):
            self._inner, self._owner = inner, owner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._inner.read(max_bytes, self._owner.clamp(timeout, core.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, self._owner.clamp(timeout, core.WriteTimeout))

        def close(self) -> None:
            self._owner.forget(self)
            self._inner.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            self._owner.forget(self)
            inner = self._inner.start_tls(ssl_context, server_hostname, self._owner.clamp(timeout, core.ConnectTimeout))
            return self._owner.track(Stream(inner, self._owner))

        def get_extra_info(self, info: str):
            return self._inner.get_extra_info(info)

    class Backend(core.NetworkBackend):
        def __init__(self):
            self._inner = core.SyncBackend()
            self._local = threading.local()
            self._streams: weakref.WeakSet = weakref.WeakSet()
            self._lock = threading.Lock()
            self.closed = False

        def set_deadline(self, t: float | None) -> None:
            self._local.deadline = t

        def clamp(self, timeout: float | None, exc_type):
            if self.closed:
                raise core.ReadError("the engine was closed")
            d = getattr(self._local, "deadline", None)
            if d is None:
                return timeout
            left = d - time.monotonic()
            if left <= 0:
                raise exc_type("the request's deadline passed")
            return left if timeout is None else min(timeout, left)

        def track(self, stream):
            with self._lock:
                closed = self.closed
                if not closed:
                    self._streams.add(stream)
            if closed:
                stream._inner.close()
                raise core.ConnectError("the engine was closed")
            return stream

        def forget(self, stream) -> None:
            with self._lock:
                self._streams.discard(stream)

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            inner = self._inner.connect_tcp(host, port, self.clamp(timeout, core.ConnectTimeout), local_address,
                                            socket_options)
            return self.track(Stream(inner, self))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            inner = self._inner.connect_unix_socket(path, self.clamp(timeout, core.ConnectTimeout), socket_options)
            return self.track(Stream(inner, self))

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

        def abort(self) -> None:
            """Shut down every open socket: threads blocked on one return at once with an error."""
            with self._lock:
                self.closed = True
                streams = list(self._streams)
            for st in streams:
                sock = st.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    return Backend()


class _Malformed(ValueError):
    """The server answered 2xx with something that is not a well-formed chat completion."""


def _as_count(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def png_data_url(pixels) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIEngine(Engine):
    """Point queries against an OpenAI-compatible server.

    Options (densify.engines.options.OpenAIOptions, typed or as keywords): base_url (".../v1"), model (default: the server's only model, else the profile's), api_key_env
    (name of the environment variable holding the key; default OPENAI_API_KEY; sent as a Bearer token when
    set), concurrency (requests in flight), timeout_s (wall-clock deadline of one attempt: connect, send and
    the whole answer), connect_timeout_s (of the connect alone), retries (further attempts after a timeout,
    a connection error, 429 or 5xx), backoff_s / max_backoff_s (seconds; doubled per retry, with jitter),
    structured_field ("structured_outputs" or "guided_regex"), send_uuids (image uids as vLLM `uuid`
    fields), batches_in_flight (how many batches `stream` keeps queued), extra_body (merged into every
    request), check_server (probe /models at start).
    """

    name = OpenAIOptions.engine_name

    def __init__(self, profile: Profile | str, options: OpenAIOptions | None = None, **kwargs):
        self.options = o = OpenAIOptions.given(options, kwargs)
        base_url, model, api_key_env, concurrency = o.base_url, o.model, o.api_key_env, o.concurrency
        timeout_s, connect_timeout_s, retries, backoff_s = o.timeout_s, o.connect_timeout_s, o.retries, o.backoff_s
        max_backoff_s, structured_field, send_uuids = o.max_backoff_s, o.structured_field, o.send_uuids
        batches_in_flight, extra_body, check_server = o.batches_in_flight, o.extra_body, o.check_server
        self.profile = load_profile(profile)
        self.base_url = base_url.rstrip("/")
        u = urllib.parse.urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise EngineStartError(f"openai engine: base_url must look like http://HOST:PORT/v1, got "
                                   f"{redact(base_url)!r}")
        self._port = u.port
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        for k, v in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a positive number of seconds, got {v!r}")
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = min(float(connect_timeout_s), self.timeout_s)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        if structured_field not in ("structured_outputs", "guided_regex"):
            raise ValueError("structured_field must be 'structured_outputs' or 'guided_regex'")
        self.structured_field = structured_field
        self.send_uuids = bool(send_uuids)
        self.batches_in_flight = max(1, int(batches_in_flight))
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self.__api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
        self._closed = threading.Event()
        self._urls: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._urls_lock = threading.Lock()
        self.stats = collections.Counter()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._client = None
        self._backend = None
        self._sdk = _sdk()
        openai, http, core = self._sdk
        self._backend = _deadline_backend(core)
        # trust_env=False: no proxy or certificate settings from the environment (and the deadline backend
        # covers every connection)
        transport = http.HTTPTransport(limits=http.Limits(max_connections=self.concurrency + 1,
                                                          max_keepalive_connections=self.concurrency + 1),
                                       trust_env=False)
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = self._backend
        else:  # pragma: no cover - a transport without httpcore's pool: per-read timeouts only
            log.warning("openai engine: cannot install the wall-clock deadline; timeout_s applies per socket read")
        headers: dict[str, Any] = {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
        # no key: no Authorization header at all (the SDK accepts that only per request)
        self._extra_headers = {} if self.__api_key else {"Authorization": openai.Omit()}
        timeout = openai.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        self._client = openai.OpenAI(api_key=self.__api_key or "unused", base_url=self.base_url, timeout=timeout,
                                     max_retries=0, default_headers=headers,
                                     http_client=http.Client(transport=transport, timeout=timeout, trust_env=False))
        self._pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="densify-openai")
        self.model = model
        try:
            if check_server:
                self.model = self._probe(model)
        except BaseException:
            self.close()
            raise
        if self.model is None:
            self.model = self.profile.model

    def __repr__(self) -> str:  # never shows the key
        return (f"OpenAIEngine(base_url={redact(self.base_url)!r}, model={self.model!r}, "
                f"concurrency={self.concurrency})")

    def _redact(self, text: object, limit: int | None = 300) -> str:
        return redact(text, [self.__api_key], limit)

    # -- http
    def _exchange(self, call):
        """One HTTP exchange through the SDK (no retries) under the wall-clock deadline -> parsed JSON."""
        self._backend.set_deadline(time.monotonic() + self.timeout_s)
        try:
            raw = call()
            data = raw.http_response.content
        finally:
            self._backend.set_deadline(None)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Malformed(f"the response is not JSON: {self._redact(repr(data[:200]))}") from None

    def _status_text(self, exc) -> str:
        """'HTTP <status>: <the server's message>', redacted."""
        body, msg = getattr(exc, "body", None), None
        for _ in range(3):  # {"error": {"message": ...}}, {"message": ...}, {"error": "..."}, "..."
            if isinstance(body, dict):
                body = body.get("error", body.get("message", body.get("detail")))
            else:
                break
        if isinstance(body, str):
            msg = body
        if msg is None:
            try:
                msg = exc.response.text[:300].strip()
            except Exception:  # pragma: no cover
                msg = ""
        return f"HTTP {exc.status_code}: {self._redact(msg)}"

    def _probe(self, model: str | None) -> str | None:
        openai = self._sdk[0]
        url = redact(f"{self.base_url}/models")
        try:
            listing = self._exchange(
                lambda: self._client.models.with_raw_response.list(extra_headers=self._extra_headers))
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise EngineStartError(
                    f"openai engine: {url} refused the API key ({self._status_text(exc)}); put the key in the "
                    f"environment variable {self.api_key_env!r} (engine option api_key_env)") from None
            log.warning("openai engine: %s answered %s; going on without a model listing", url,
                        self._status_text(exc))
            return model
        except openai.APITimeoutError:
            raise EngineStartError(
                f"openai engine: the server at {url} did not answer within timeout_s={self.timeout_s:g} s; check "
                f"that it has finished loading, or raise engine.options.timeout_s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise EngineStartError(
                f"openai engine: cannot reach an OpenAI-compatible server at {url} ({type(cause).__name__}: "
                f"{self._redact(cause)}). Start one, e.g. `vllm serve MODEL --port {self._port or 8000}`, or set "
                f"engine.options.base_url to where it runs") from None
        except _Malformed as exc:
            log.warning("openai engine: %s answered %s; going on without a model listing", url, exc)
            return model
        data = listing.get("data") if isinstance(listing, dict) else None
        ids = [m.get("id") for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(data, list) else []
        if model is None:
            if len(ids) == 1:
                return ids[0]
            if self.profile.model in ids:
                return self.profile.model
            if ids:
                raise EngineStartError(f"openai engine: the server at {redact(self.base_url)} serves {ids}; "
                                       f"choose one with engine.options.model")
            return None
        if ids and model not in ids:
            raise EngineStartError(f"openai engine: the server at {redact(self.base_url)} does not serve "
                                   f"{model!r} (it serves {ids}); fix engine.options.model")
        return model

    # -- requests
    def image_url(self, img: PromptImage) -> str:
        with self._urls_lock:
            url = self._urls.get(img.uid)
            if url is not None:
                self._urls.move_to_end(img.uid)
                return url
        url = png_data_url(img.pixels)
        with self._urls_lock:
            self._urls[img.uid] = url
            while len(self._urls) > 64:
                self._urls.popitem(last=False)
        return url

    def request_body(self, batch: EngineBatch, q: Query) -> dict:
        s = batch.sampling
        parts: list[dict] = []
        for uid in q.image_uids:
            part: dict[str, Any] = {"type": "image_url", "image_url": {"url": self.image_url(batch.images[uid])}}
            if self.send_uuids:
                part["uuid"] = uid
            parts.append(part)
        messages = chat_messages(parts, q.text, s.system_prompt)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(s.max_tokens),
                                "temperature": 0.0, "n": 1, "stream": False}
        if s.prefill:
            messages.append({"role": "assistant", "content": s.prefill})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if s.stop:
            body["stop"] = list(s.stop)
        if s.structured_regex:
            if self.structured_field == "structured_outputs":
                body["structured_outputs"] = {"regex": s.structured_regex}
            else:
                body["guided_regex"] = s.structured_regex
        if s.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = 0
        body.update(self.extra_body)
        return body

    def _post(self, body: dict) -> dict:
        named = {k: body[k] for k in _SDK_FIELDS if k in body}
        extra = {k: v for k, v in body.items() if k not in named}
        return self._exchange(lambda: self._client.chat.completions.with_raw_response.create(**named, extra_body=extra,
                                                                   extra_headers=self._extra_headers))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff_s, self.backoff_s * (2 ** attempt)) * (0.75 + 0.5 * random.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff_s))
        return d

    def _one(self, batch: EngineBatch, q: Query) -> Completion:
        openai = self._sdk[0]
        s = batch.sampling
        try:
            body = self.request_body(batch, q)
        except Exception as exc:
            return Completion("", error=f"could not build the request: {type(exc).__name__}: {self._redact(exc)}")
        last, attempt = "", 0
        for attempt in range(self.retries + 1):
            if self._closed.is_set():
                last = "the engine was closed" + (f" (last error: {last})" if last else "")
                break
            if attempt:
                self.stats["retries"] += 1
            retry_after = None
            try:
                return self._completion(self._post(body), s)
            except openai.APITimeoutError:
                last = f"timed out after {self.timeout_s:g} s (timeout_s)"
            except openai.APIStatusError as exc:
                last = self._status_text(exc)
                if exc.status_code not in RETRY_STATUS:
                    break
                try:
                    retry_after = float(exc.response.headers.get("retry-after"))
                except (TypeError, ValueError):
                    retry_after = None
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                last = f"connection error: {type(cause).__name__}: {self._redact(cause)}"
            except _Malformed as exc:  # no point in asking again
                last = f"malformed answer: {exc}"
                break
            except Exception as exc:
                last = "the engine was closed" if self._closed.is_set() else \
                    f"{type(exc).__name__}: {self._redact(exc)}"
                break
            if attempt == self.retries:
                break
            if self._closed.wait(self._backoff(attempt, retry_after)):
                last = f"the engine was closed (last error: {last})"
                break
        self.stats["failed"] += 1
        tries = f" after {attempt + 1} attempts" if attempt else ""
        return Completion("", error=f"{last}{tries}")

    def _completion(self, resp, s) -> Completion:
        """A chat completion -> Completion; anything but a string answer is _Malformed (never stored)."""
        choices = resp.get("choices") if isinstance(resp, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise _Malformed(f"no choices in the response: {self._redact(str(resp)[:200])}")
        msg = choice.get("message")
        text = msg.get("content") if isinstance(msg, dict) else None
        if text is None and "text" in choice:
            text = choice.get("text")
        if not isinstance(text, str):
            raise _Malformed(f"the answer is {type(text).__name__}, not text: {self._redact(repr(text)[:100])}")
        if s.prefill and not text.startswith(s.prefill):
            text = s.prefill + text
        lp = None
        if s.logprobs:
            lps = choice.get("logprobs")
            items = lps.get("content") if isinstance(lps, dict) else None
            vals = [it.get("logprob") for it in items if isinstance(it, dict)] if isinstance(items, list) else []
            if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in vals):
                lp = float(sum(vals))
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
        details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
        return Completion(text=text, logprob=lp, n_prompt_tokens=_as_count(usage.get("prompt_tokens")),
                          n_generated_tokens=_as_count(usage.get("completion_tokens")),
                          cached_prompt_tokens=_as_count(details.get("cached_tokens")))

    # -- the protocol
    def _submit(self, batch: EngineBatch) -> list[cf.Future]:
        check_batch(batch)
        pool = self._pool
        if pool is None:
            raise EngineError("openai engine is closed")
        try:
            return [pool.submit(self._one, batch, q) for q in batch.queries]
        except RuntimeError:  # closed between the check and the submit
            raise EngineError("openai engine is closed") from None

    @staticmethod
    def _results(futs: list[cf.Future]) -> list[Completion]:
        try:
            return [f.result() for f in futs]
        except cf.CancelledError:
            raise EngineError("openai engine was closed with queries in flight") from None

    def generate(self, batch: EngineBatch) -> list[Completion]:
        return self._results(self._submit(batch))

    def stream(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        """Keeps `batches_in_flight` batches queued on the pool; yields them in order.

        On a None from `batches` ("nothing new yet") it yields the finished batches at the head of the
        window without blocking, waiting at most a few milliseconds for the head when none is finished."""
        if self._pool is None:
            raise EngineError("openai engine is closed")
        window: collections.deque = collections.deque()
        try:
            for batch in batches:
                if batch is None:
                    if not window:
                        time.sleep(0.001)  # nothing held: do not spin on the source
                        continue
                    cf.wait(window[0][1], timeout=0.005)
                    while window and all(f.done() for f in window[0][1]):
                        b, futs = window.popleft()
                        yield b, self._results(futs)
                    continue
                window.append((batch, self._submit(batch)))
                while len(window) >= self.batches_in_flight:
                    b, futs = window.popleft()
                    yield b, self._results(futs)
            while window:
                b, futs = window.popleft()
                yield b, self._results(futs)
        finally:
            for _, futs in window:
                for f in futs:
                    f.cancel()

    def close(self) -> None:
        """Stops at once: queued queries are cancelled, backoff waits end, open sockets are shut down (the
        queries in flight end with an error record); never waits out a timeout or a retry."""
        self._closed.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._backend is not None:
            self._backend.abort()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - closing is best effort
                pass
