"""openai.transform with ``mode: batch``: a run's items through the Batch API, at half price.

The items' requests are written as JSONL (one chat completion per item, ``custom_id``
naming the run and the item), uploaded, and submitted as one batch per 50,000 requests
or 200 MB. Each batch is stored in the history (``model_batches``) the moment it is
created, so a process that dies while waiting does not submit it again: the run, when
resumed, finds the batch by run and step and polls it where it was.

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
import json
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletion

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
        jobs, fresh = self._reattach(stored, leaders)
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

    def _reattach(self, stored: list[Any], requests: list[Request]) -> tuple[list[Job], list[Request]]:
        """Requests a batch of this run already carries wait for it; the rest are to be sent."""
        by_id = {r.custom_id: r for r in requests}
        jobs: list[Job] = []
        for row in stored:
            if row.status == "collected":
                continue
            members = [
                by_id.pop(cid) for cid, key in (row.requests or {}).items() if cid in by_id and by_id[cid].key == key
            ]
            if members:
                jobs.append(Job(row.id, row.batch_id, row.status, members))
        return jobs, list(by_id.values())

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
        client = await step.client()
        run_id = self.context.run_id
        name = f"automator-run-{run_id}-{step.step_id}.jsonl"
        upload = await self._api(
            "uploading the batch input", lambda: client.files.create(file=(name, content), purpose="batch")
        )
        batch = await self._api(
            "creating the batch",
            lambda: client.batches.create(
                input_file_id=upload.id,
                endpoint=ENDPOINT,
                completion_window=COMPLETION_WINDOW,
                metadata={"automator_run": str(run_id), "automator_step": step.step_id[:500]},
            ),
        )
        # stored before anything else can fail: a restarted process collects it instead of paying again
        row_id = await asyncio.to_thread(
            records.add_batch,
            self.history,
            run_id=run_id,
            workflow=self.context.workflow.name,
            step_id=step.step_id,
            model=step.config.model,
            batch_id=batch.id,
            input_file_id=upload.id,
            status=batch.status,
            request_count=len(members),
            requests={r.custom_id: r.key for r in members},
        )
        step.stats["batches"] += 1
        return Job(row_id, batch.id, batch.status, members)

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
                    ChatCompletion.model_validate(response.get("body")),
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
