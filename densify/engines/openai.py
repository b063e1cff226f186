"""The `openai` engine: an already running OpenAI-compatible chat server (e.g. `vllm serve MODEL`).

Each query is one `POST {base_url}/chat/completions`: an optional system message, then one user message
whose content is the image(s) as base64 PNG data URLs (`image_url` parts, each with the image's uid as
vLLM's `uuid`, so the server's caches key on it), then the text. Greedy (`temperature` 0), `max_tokens` from
the batch. A prefill goes in as a final assistant message with `continue_final_message` (vLLM renders it
right after the generation prompt, as the hf engine does) and is put back at the start of the answer.
Structured output sends the profile's regex as `structured_outputs: {"regex": ...}` (vLLM >= 0.11; set
`structured_field="guided_regex"` for older servers).

Requests run on a bounded thread pool (`concurrency`), with keep-alive connections, a per-request
`timeout`, and retries with exponential backoff on connection errors, timeouts, 429 and 5xx. A query that
still fails gets a `Completion(error=...)`; only a server that cannot be reached when the engine starts
raises `EngineError`. The API key is read from the environment variable named by `api_key_env` and is
never logged. Standard library only.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import http.client
import io
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from typing import Any, Iterable, Iterator

from densify.engines.base import Completion, Engine, EngineBatch, EngineError, EngineStartError, PromptImage, Query, check_batch
from densify.profiles import Profile, load_profile
from densify.prompts import chat_messages

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


def png_data_url(pixels) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIEngine(Engine):
    """Point queries against an OpenAI-compatible server.

    Options: base_url (".../v1"), model (default: the server's only model, else the profile's), api_key_env
    (name of the environment variable holding the key; default OPENAI_API_KEY; sent as a Bearer token when
    set), concurrency (requests in flight), timeout (seconds per request), connect_timeout, max_retries,
    backoff / max_backoff (seconds; doubled per retry, with jitter), structured_field ("structured_outputs"
    or "guided_regex"), send_uuids (image uids as vLLM `uuid` fields), batches_in_flight (how many batches
    `stream` keeps queued), extra_body (merged into every request), check_server (probe /models at start).
    """

    name = "openai"

    def __init__(self, profile: Profile | str, *, base_url: str = "http://127.0.0.1:8000/v1",
                 model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 64,
                 timeout: float = 120.0, connect_timeout: float = 10.0, max_retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 20.0, structured_field: str = "structured_outputs",
                 send_uuids: bool = True, batches_in_flight: int = 2, extra_body: dict | None = None,
                 check_server: bool = True):
        self.profile = load_profile(profile)
        self.base_url = base_url.rstrip("/")
        u = urllib.parse.urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise EngineError(f"openai engine: base_url must look like http://HOST:PORT/v1, got {base_url!r}")
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._path = u.path.rstrip("/")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        if structured_field not in ("structured_outputs", "guided_regex"):
            raise ValueError("structured_field must be 'structured_outputs' or 'guided_regex'")
        self.structured_field = structured_field
        self.send_uuids = bool(send_uuids)
        self.batches_in_flight = max(1, int(batches_in_flight))
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self.__api_key = os.environ.get(api_key_env) if api_key_env else None
        self._local = threading.local()
        self._pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="densify-openai")
        self._urls: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._urls_lock = threading.Lock()
        self.stats = collections.Counter()
        self.model = model
        if check_server:
            self.model = self._probe(model)
        if self.model is None:
            self.model = self.profile.model

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # -- http
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json", "Connection": "keep-alive"}
        if self.__api_key:
            h["Authorization"] = f"Bearer {self.__api_key}"
        return h

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.connect_timeout)
            self._local.conn = conn
        if conn.sock is None:
            conn.connect()
        conn.sock.settimeout(timeout)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover
                pass

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """One HTTP exchange (no retries). Raises _HTTPError for non-2xx, OSError family for transport."""
        data = json.dumps(body).encode() if body is not None else None
        try:
            conn = self._conn(timeout or self.timeout)
            conn.request(method, self._path + path, body=data, headers=self._headers())
            resp = conn.getresponse()
            raw = resp.read()
        except BaseException:
            self._drop_conn()
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self._drop_conn()
        if not 200 <= resp.status < 300:
            msg = raw[:300].decode("utf-8", "replace").strip()
            try:
                err = json.loads(raw).get("error") or json.loads(raw).get("message")
                msg = err.get("message", msg) if isinstance(err, dict) else (err or msg)
            except Exception:
                pass
            ra = resp.getheader("Retry-After")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            raise _HTTPError(resp.status, str(msg)[:300], ra)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _HTTPError(resp.status, f"response is not JSON: {raw[:200]!r}") from exc

    def _probe(self, model: str | None) -> str | None:
        url = f"{self.base_url}/models"
        try:
            listing = self._request("GET", "/models", timeout=self.connect_timeout)
        except _HTTPError as exc:
            if exc.status in (401, 403):
                raise EngineStartError(f"openai engine: {url} refused the API key ({exc}); put the key in the "
                                  f"environment variable {self.api_key_env!r} (engine option api_key_env)") from exc
            log.warning("openai engine: %s answered %s; going on without a model listing", url, exc)
            return model
        except (OSError, http.client.HTTPException) as exc:
            raise EngineStartError(f"openai engine: cannot reach an OpenAI-compatible server at {url} "
                              f"({type(exc).__name__}: {exc}). Start one, e.g. `vllm serve MODEL --port "
                              f"{self._port or 8000}`, or set engine.options.base_url to where it runs") from exc
        finally:
            self._drop_conn()
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if model is None:
            if len(ids) == 1:
                return ids[0]
            if self.profile.model in ids:
                return self.profile.model
            if ids:
                raise EngineStartError(f"openai engine: the server at {self.base_url} serves {ids}; choose one with "
                                  f"engine.options.model")
            return None
        if ids and model not in ids:
            raise EngineStartError(f"openai engine: the server at {self.base_url} does not serve {model!r} (it serves "
                              f"{ids}); fix engine.options.model")
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

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.75 + 0.5 * random.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff))
        return d

    def _one(self, batch: EngineBatch, q: Query) -> Completion:
        s = batch.sampling
        try:
            body = self.request_body(batch, q)
        except Exception as exc:
            return Completion("", error=f"could not build the request: {type(exc).__name__}: {exc}")
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            try:
                resp = self._request("POST", "/chat/completions", body)
                return self._completion(resp, s)
            except _HTTPError as exc:
                last = str(exc)
                if exc.status not in RETRY_STATUS or attempt == self.max_retries:
                    break
                time.sleep(self._backoff(attempt, exc.retry_after))
            except (socket.timeout, TimeoutError) as exc:
                last = f"timed out after {self.timeout:g} s ({type(exc).__name__})"
                if attempt == self.max_retries:
                    break
                time.sleep(self._backoff(attempt, None))
            except (OSError, http.client.HTTPException) as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
                if attempt == self.max_retries:
                    break
                time.sleep(self._backoff(attempt, None))
            except Exception as exc:  # a malformed answer: no point in retrying
                last = f"{type(exc).__name__}: {exc}"
                break
        self.stats["failed"] += 1
        tries = f" after {attempt + 1} attempts" if attempt else ""
        return Completion("", error=f"{last}{tries}")

    @staticmethod
    def _completion(resp: dict, s) -> Completion:
        choice = (resp.get("choices") or [None])[0]
        if not isinstance(choice, dict):
            raise ValueError(f"no choices in the response: {str(resp)[:200]}")
        msg = choice.get("message") or {}
        text = msg.get("content")
        if text is None:
            text = choice.get("text") or ""
        if s.prefill and not text.startswith(s.prefill):
            text = s.prefill + text
        lp = None
        if s.logprobs:
            items = ((choice.get("logprobs") or {}).get("content")) or []
            vals = [it.get("logprob") for it in items if isinstance(it, dict)]
            if vals and all(isinstance(v, (int, float)) for v in vals):
                lp = float(sum(vals))
        usage = resp.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Completion(text=text, logprob=lp, n_prompt_tokens=usage.get("prompt_tokens"),
                          n_generated_tokens=usage.get("completion_tokens"),
                          cached_prompt_tokens=details.get("cached_tokens"))

    # -- the protocol
    def _submit(self, batch: EngineBatch) -> list[cf.Future]:
        check_batch(batch)
        return [self._pool.submit(self._one, batch, q) for q in batch.queries]

    def generate(self, batch: EngineBatch) -> list[Completion]:
        if self._pool is None:
            raise EngineError("openai engine is closed")
        return [f.result() for f in self._submit(batch)]

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
                        yield b, [f.result() for f in futs]
                    continue
                window.append((batch, self._submit(batch)))
                while len(window) >= self.batches_in_flight:
                    b, futs = window.popleft()
                    yield b, [f.result() for f in futs]
            while window:
                b, futs = window.popleft()
                yield b, [f.result() for f in futs]
        finally:
            for _, futs in window:
                for f in futs:
                    f.cancel()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

