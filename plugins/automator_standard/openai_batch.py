"""openai.transform with ``mode: batch``: a run's items through the Batch API, at half price.

The items' requests are written as JSONL (one chat completion per item, ``custom_id``
naming the run and the item), uploaded, and submitted as one batch per 50,000 requests
or 200 MB. Each batch is stored in the history (``model_batches``) the moment it is
created, so a process that dies while waiting does not submit it again: the run, when
resumed, finds the batch by run and step and polls it where it was. A process that dies
between ``batches.create`` returning and that row being written leaves a batch the
history does not know; each batch therefore carries its run, step and the SHA-256 of its
input file in ``metadata``, and a resumed run (or a retried create whose first attempt may
have reached OpenAI) lists the account's recent batches and adopts the one that matches
instead of paying for it twice. Items whose answer in an already-collected batch was an
error or was rejected end, on resume, as the calls recorded for them say (not re-sent).

Answers come back through the same checks as sync mode. An answer that is cut off,
refused, filtered or breaks the schema is re-asked through the sync path at once (full
price, up to ``max_repairs`` times) rather than waiting another batch window; with
``max_repairs: 0`` it is quarantined with the reason. A request the Batch API answered
with an error, or left unanswered (a failed, expired or cancelled batch), fails its item
with the reason. Every item gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from automator import Item, ModelError, QuarantineItem
from automator.llm import pricing, records
from automator_standard.openai_client import CallFailed, Reply, failure, reply_from
from automator_standard.openai_prompt import Prompt, repair_turns, request_key

if TYPE_CHECKING:
    from automator_standard.openai_transform import OpenAITransform

# The Batch API's limits per input file; patched smaller by tests
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
TERMINAL = ("completed", "failed", "expired", "cancelled")
API_RETRIES = 5  # uploads, creates, polls and downloads: transient failures retried
LIST_PAGE = 100  # batches per page when looking for one this run already created (the API's maximum)
# batches listed newest first; the search stops at those created this long before the run started
LIST_CLOCK_SLACK_S = 600
REPAIR_CONCURRENCY = 16

_UNSET: Any = object()


@dataclass
class Request:
    """One item's request, waiting for its answer."""

    index: int
    item: Item
    prompt: Prompt
    prompt_tokens: int
    key: str
    custom_id: str
    params: dict[str, Any]
    reserved: Decimal = Decimal(0)


@dataclass
class Job:
    """One submitted batch and the requests it carries."""

    row_id: int
    batch_id: str
    status: str
    requests: list[Request]
    created: float = field(default_factory=time.monotonic)
    data: Any = None


def custom_id(run_id: int, seq: int) -> str:
    return f"run-{run_id}-item-{seq}"


def jsonl_line(request: Request) -> bytes:
    line = {"custom_id": request.custom_id, "method": "POST", "url": ENDPOINT, "body": request.params}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def split(requests: list[Request], max_requests: int, max_bytes: int) -> list[tuple[list[Request], bytes]]:
    """Input files under both limits (a request larger than the byte limit goes alone; the API judges it)."""
    chunks: list[tuple[list[Request], bytes]] = []
    members: list[Request] = []
    lines: list[bytes] = []
    size = 0
    for request in requests:
        line = jsonl_line(request)
        if members and (len(members) >= max_requests or size + len(line) > max_bytes):
            chunks.append((members, b"".join(lines)))
            members, lines, size = [], [], 0
        members.append(request)
        lines.append(line)
        size += len(line)
    if members:
        chunks.append((members, b"".join(lines)))
    return chunks


class BatchTransform:
    """All of one step's items through the Batch API; ``run(items)`` gives one outcome per item."""

    def __init__(self, step: OpenAITransform) -> None:
        self.step = step
        self.context = step.context
        self.history = step.context.history
        self.outcomes: list[Any] = []
        self._known: set[str] = set()  # batch ids the history has for this run and step
        info = step.context.info
        # a resumed run may have created a batch whose row never got written
        self.resumed = info.resumed or info.trigger == "resume"

    # -- the whole step ----------------------------------------------------------------

    async def run(self, items: list[Item]) -> list[Any]:
        step = self.step
        await step.client()
        self.outcomes = [_UNSET] * len(items)
        stored = await asyncio.to_thread(records.run_batches, self.history, self.context.run_id, step.step_id)
        resuming = bool(stored)
        requests: list[Request] = []
        for index, item in enumerate(items):
            try:
                request = self._request(index, item)
                # a resumed run reads the answers its predecessor collected, whatever the temperature
                cached = await step._cached(item, request.key, force=resuming)
            except Exception as exc:  # noqa: BLE001 - this item's outcome; the others go on
                self.outcomes[index] = exc
                continue
            if cached is not None:
                self.outcomes[index] = step.result(item, cached["content"])
            else:
                requests.append(request)
        leaders, followers = self._dedupe(requests)
        self._known = {row.batch_id for row in stored}
        jobs, fresh, settled = self._reattach(stored, leaders)
        fresh += await self._ended_before(settled)
        jobs += await self._submit(fresh)
        await self._wait(jobs)
        for request, leader in followers:
            self._follow(request, leader)
        return self.outcomes

    def _request(self, index: int, item: Item) -> Request:
        step = self.step
        prompt = step.prompt(item)
        prompt_tokens = step.count(prompt, prompt.messages)
        step.check_fits(prompt_tokens)
        params = step.params(prompt.messages)
        return Request(
            index, item, prompt, prompt_tokens, request_key(params), custom_id(self.context.run_id, item.seq), params
        )

    def _dedupe(self, requests: list[Request]) -> tuple[list[Request], list[tuple[Request, Request]]]:
        """Identical requests are sent once when the cache applies; the others take that answer."""
        if not self.step.reads_cache:
            return requests, []
        first: dict[str, Request] = {}
        followers: list[tuple[Request, Request]] = []
        for request in requests:
            if request.key in first:
                followers.append((request, first[request.key]))
            else:
                first[request.key] = request
        return list(first.values()), followers

    def _follow(self, request: Request, leader: Request) -> None:
        outcome = self.outcomes[leader.index]
        if isinstance(outcome, BaseException):
            self.outcomes[request.index] = outcome
            return
        answer = self.step.recorder.pending_cache(leader.key)
        if answer is None:
            self.outcomes[request.index] = ModelError(f"no answer for the identical item {leader.item.seq}")
            return
        self.step.stats["cached"] += 1
        self.step._record(request.item, 0, reply=None, status="cached", mode="cache")
        self.outcomes[request.index] = self.step.result(request.item, answer["content"])

    # -- submitting ------------------------------------------------------------------------

    def _reattach(self, stored: list[Any], requests: list[Request]) -> tuple[list[Job], list[Request], list[Request]]:
        """Requests a batch of this run already carries wait for it; the rest are to be sent.

        Also gives the requests of batches already collected (their answers were not in the
        response cache, so they were errors or rejected: see ``_ended_before``).
        """
        by_id = {r.custom_id: r for r in requests}
        jobs: list[Job] = []
        settled: list[Request] = []
        for row in stored:
            members = [
                by_id.pop(cid) for cid, key in (row.requests or {}).items() if cid in by_id and by_id[cid].key == key
            ]
            if row.status == "collected":
                settled += members
            elif members:
                jobs.append(Job(row.id, row.batch_id, row.status, members))
        return jobs, list(by_id.values()), settled

    async def _ended_before(self, requests: list[Request]) -> list[Request]:
        """Outcomes, from the calls recorded, of requests a collected batch answered unusably.

        The calls reach the history before a batch counts as collected, so an item whose
        last call was an error fails with it and one whose last answer was rejected is
        quarantined, as before the restart; paying for the same request again would not
        change the answer. Requests with no such call are given back to be sent.
        """
        if not requests:
            return []
        last = await asyncio.to_thread(records.last_calls, self.history, self.context.run_id, self.step.step_id)
        note = "(answered in a batch before the run was resumed; not sent again)"
        again: list[Request] = []
        for request in requests:
            status, error = last.get(request.item.seq, ("", None))
            if status == "error":
                self.outcomes[request.index] = ModelError(f"{error} {note}", retryable=False)
            elif status == "rejected":
                self.outcomes[request.index] = QuarantineItem(
                    f"{self.step.config.model} gave no acceptable answer: {error} {note}"
                )
            else:
                again.append(request)
        return again

    async def _submit(self, requests: list[Request]) -> list[Job]:
        step = self.step
        assert step.budget is not None
        affordable: list[Request] = []
        for request in requests:
            bound = pricing.upper_bound(
                step.prices,
                input_tokens=request.prompt_tokens,
                max_output_tokens=step.config.max_output_tokens,
                batch=True,
            )
            try:
                step.budget.reserve(bound)
            except Exception as exc:  # noqa: BLE001 - BudgetExceeded: not sent, the item fails with why
                self.outcomes[request.index] = exc
                continue
            request.reserved = bound
            affordable.append(request)
        limit = min(step.config.batch_max_requests, MAX_REQUESTS)
        jobs = []
        for members, content in split(affordable, limit, MAX_FILE_BYTES):
            try:
                jobs.append(await self._create(members, content))
            except ModelError as exc:
                for request in members:
                    self._settle(request, Decimal(0))
                    self.outcomes[request.index] = exc
        return jobs

    async def _create(self, members: list[Request], content: bytes) -> Job:
        step = self.step
        run_id = self.context.run_id
        digest = hashlib.sha256(content).hexdigest()
        metadata = {"automator_run": str(run_id), "automator_step": step.step_id[:500], "automator_input": digest}
        batch = await self._adopt(metadata) if self.resumed else None
        if batch is None:
            batch = await self._upload_and_create(content, metadata)
        else:
            step.stats["adopted"] += 1
        self._known.add(batch.id)
        # stored before anything else can fail: a restarted process collects it instead of paying again
        row_id = await asyncio.to_thread(
            records.add_batch,
            self.history,
            run_id=run_id,
            workflow=self.context.workflow.name,
            step_id=step.step_id,
            model=step.config.model,
            batch_id=batch.id,
            input_file_id=batch.input_file_id,
            status=batch.status,
            request_count=len(members),
            requests={r.custom_id: r.key for r in members},
        )
        step.stats["batches"] += 1
        return Job(row_id, batch.id, batch.status, members)

    async def _upload_and_create(self, content: bytes, metadata: dict[str, str]) -> Any:
        # A crash between the upload and the create leaves an orphan input file: files cost
        # nothing but storage, so it is uploaded again rather than looked for.
        client = await self.step.client()
        name = f"automator-run-{metadata['automator_run']}-{self.step.step_id}.jsonl"
        upload = await self._api(
            "uploading the batch input", lambda: client.files.create(file=(name, content), purpose="batch")
        )
        attempted = False

        async def create() -> Any:
            nonlocal attempted
            # an attempt that failed (a timeout, a 5xx) may have created the batch all the same
            found = await self._find(metadata) if attempted else None
            attempted = True
            if found is not None:
                return found
            return await client.batches.create(
                input_file_id=upload.id,
                endpoint=ENDPOINT,
                completion_window=COMPLETION_WINDOW,
                metadata=metadata,
            )

        return await self._api("creating the batch", create)

    async def _adopt(self, metadata: dict[str, str]) -> Any:
        return await self._api("looking for a batch created before the restart", lambda: self._find(metadata))

    async def _find(self, metadata: dict[str, str]) -> Any:
        """This run's batch with these requests, if OpenAI has one the history does not know.

        Batches are listed newest first (``after``/``limit`` pages); the search stops at those
        created well before the run started, so it reads only this run's time span.
        """
        client = await self.step.client()
        started = self.context.info.started_at
        if started.tzinfo is None:  # SQLite gives naive datetimes; the history keeps UTC
            started = started.replace(tzinfo=UTC)
        oldest = started.timestamp() - LIST_CLOCK_SLACK_S
        async for batch in client.batches.list(limit=LIST_PAGE):
            if batch.created_at < oldest:
                break
            if batch.id in self._known:
                continue
            tags = batch.metadata or {}
            if all(tags.get(key) == value for key, value in metadata.items()):
                return batch
        return None

    async def _api(self, doing: str, call: Any) -> Any:
        """One Batch/Files API call, transient failures retried with backoff."""
        last: CallFailed | None = None
        for attempt in range(API_RETRIES + 1):
            started = time.monotonic()
            try:
                return await call()
            except Exception as exc:
                failed = failure(exc, int((time.monotonic() - started) * 1000))
                if failed is None:
                    raise
                last = failed
                if not failed.retryable or attempt == API_RETRIES:
                    break
                await asyncio.sleep(self.step._backoff(attempt, failed))
        assert last is not None
        raise ModelError(f"{doing}: {last.message}", retryable=False)

    # -- waiting and collecting --------------------------------------------------------------

    async def _wait(self, jobs: list[Job]) -> None:
        client = await self.step.client()
        interval = self.step.config.batch_poll_interval.total_seconds()
        waiting = list(jobs)
        while waiting:
            for job in list(waiting):
                try:
                    batch = await self._api(
                        f"polling batch {job.batch_id}", functools.partial(client.batches.retrieve, job.batch_id)
                    )
                except ModelError as exc:
                    await self._give_up(job, str(exc))
                    waiting.remove(job)
                    continue
                if batch.status != job.status:
                    job.status = batch.status
                    await asyncio.to_thread(records.update_batch, self.history, job.row_id, status=batch.status)
                if batch.status in TERMINAL:
                    job.data = batch
                    await self._collect(job)
                    waiting.remove(job)
            if waiting:
                await asyncio.sleep(interval)

    async def _give_up(self, job: Job, error: str) -> None:
        for request in job.requests:
            self._settle(request, Decimal(0))
            self.outcomes[request.index] = ModelError(error, retryable=False)
        await asyncio.to_thread(records.update_batch, self.history, job.row_id, status="collected", error=error)

    async def _download(self, file_id: str | None) -> dict[str, dict[str, Any]]:
        if not file_id:
            return {}
        client = await self.step.client()
        content = await self._api(f"downloading {file_id}", lambda: client.files.content(file_id))
        lines: dict[str, dict[str, Any]] = {}
        for text in content.text.splitlines():
            if text.strip():
                line = json.loads(text)
                lines[str(line.get("custom_id"))] = line
        return lines

    async def _collect(self, job: Job) -> None:
        batch = job.data
        try:
            lines = await self._download(batch.output_file_id)
            lines.update(await self._download(batch.error_file_id))
        except (ModelError, ValueError) as exc:
            await self._give_up(job, f"batch {job.batch_id} {batch.status}, results unreadable: {exc}")
            return
        latency_ms = int((time.monotonic() - job.created) * 1000)
        missing = _why_missing(batch)
        repairs: list[tuple[Request, Reply, str]] = []
        for request in job.requests:
            line = lines.get(request.custom_id)
            if line is None:
                self._settle(request, Decimal(0))
                self._fail(request, f"no answer in batch {job.batch_id}: {missing}")
                continue
            response = line.get("response") or {}
            status = response.get("status_code")
            if status != 200:
                self._settle(request, Decimal(0))
                self._fail(request, f"the Batch API answered {status or 'an error'}: {_error_message(line)}")
                continue
            try:
                reply = reply_from(
                    _chat_completion().model_validate(response.get("body")),
                    headers={},
                    request_id=response.get("request_id"),
                    latency_ms=latency_ms,
                )
            except ValueError as exc:
                self._settle(request, Decimal(0))
                self._fail(request, f"the batch's answer could not be read: {exc}")
                continue
            self._settle(request, self.step.call_cost(reply, batch=True))
            self.step.stats["calls"] += 1
            problem, text = self.step.judge(reply)
            if problem:
                repairs.append((request, reply, problem))
            else:
                self._accept(request, reply, text)
        await self._repair_all(repairs)
        # answers reach the response cache before the batch counts as collected: a process
        # that dies in between finds them there when the run is resumed
        await self.step.recorder.flush()
        await asyncio.to_thread(
            records.update_batch,
            self.history,
            job.row_id,
            status="collected",
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            error=None if batch.status == "completed" else f"{batch.status}: {missing}",
        )

    def _settle(self, request: Request, cost: Decimal) -> None:
        budget = self.step.budget
        assert budget is not None
        budget.settle(request.reserved, cost)
        request.reserved = Decimal(0)

    def _fail(self, request: Request, reason: str) -> None:
        self.step._record(request.item, 1, reply=None, status="error", mode="batch", error=reason)
        self.outcomes[request.index] = ModelError(reason, retryable=False)

    def _accept(self, request: Request, reply: Reply, text: str) -> None:
        step = self.step
        step._record(
            request.item,
            1,
            reply=reply,
            status="ok",
            batch=True,
            prompt=request.prompt.messages,
            response=reply.content,
        )
        answer = {
            "content": text,
            "finish_reason": reply.finish_reason,
            "request_id": reply.request_id,
            "usage": {
                "input_tokens": reply.input_tokens,
                "cached_input_tokens": reply.cached_input_tokens,
                "output_tokens": reply.output_tokens,
            },
        }
        self._cache(request, answer)
        self.outcomes[request.index] = step.result(request.item, text)

    def _cache(self, request: Request, answer: dict[str, Any]) -> None:
        step = self.step
        step.recorder.cache(
            request.key,
            model=step.config.model,
            workflow=self.context.workflow.name,
            step_id=step.step_id,
            response=answer,
        )

    async def _repair_all(self, repairs: list[tuple[Request, Reply, str]]) -> None:
        """Rejected batch answers: re-asked now through the sync path, or quarantined (max_repairs: 0)."""
        limit = asyncio.Semaphore(REPAIR_CONCURRENCY)

        async def repair(request: Request, reply: Reply, problem: str) -> None:
            step = self.step
            step._record(
                request.item,
                1,
                reply=reply,
                status="rejected",
                batch=True,
                error=problem,
                prompt=request.prompt.messages,
                response=reply.content,
            )
            if step.config.max_repairs == 0:
                self.outcomes[request.index] = QuarantineItem(
                    f"{step.config.model} gave no acceptable answer in the batch: {problem}"
                )
                return
            messages = request.prompt.messages + repair_turns(
                reply.content or reply.refusal or "", problem, structured=step.structured
            )
            try:
                async with limit:
                    answer = await step._ask(
                        request.item,
                        request.prompt,
                        request.prompt_tokens,
                        messages=messages,
                        first_repair=1,
                        attempt=1,
                    )
            except Exception as exc:  # noqa: BLE001 - quarantined, failed or over budget: this item's outcome
                self.outcomes[request.index] = exc
                return
            self._cache(request, answer)
            self.outcomes[request.index] = step.result(request.item, answer["content"])

        await asyncio.gather(*(repair(*entry) for entry in repairs))


def _error_message(line: dict[str, Any]) -> str:
    error = line.get("error")
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('code') or 'error'}: {error['message']}"
    body = (line.get("response") or {}).get("body")
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
    return "no detail given"


def _why_missing(batch: Any) -> str:
    """Why a batch has no answer for a request: its status and the errors it lists."""
    reasons = []
    errors = getattr(batch, "errors", None)
    for error in getattr(errors, "data", None) or []:
        reasons.append(f"{error.code or 'error'}: {error.message or ''}".strip())
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return f"the batch ended {batch.status}{detail}"


def _chat_completion() -> Any:
    from openai.types.chat import ChatCompletion  # imported when first needed: CLI start-up time

    return ChatCompletion
