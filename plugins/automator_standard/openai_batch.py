"""openai.transform with ``mode: batch``: a run's items through the Batch API, at half price.

The items' requests are written as JSONL (one chat completion per item, ``custom_id``
naming the run and the item), uploaded, and submitted as one batch per 50,000 requests
or 200 MB. Each batch is written ahead: its row in ``model_batches`` (status ``creating``,
with the SHA-256 of its input file) is durable before ``batches.create`` is called, and
gets the batch's id once it returns, so a process that dies while waiting does not submit
it again: the run, when resumed, finds the batch by run and step and polls it where it
was. A process that dies between ``batches.create`` and the id being written leaves a
``creating`` row; each batch carries its run, step and input digest in ``metadata``, and the
resumed run (or a retried create whose first attempt may have reached OpenAI) lists the
account's recent batches and adopts the one that matches instead of paying for it twice.
The answers of a collected batch are recorded (calls and cache entries, one commit each,
shared) before the batch counts as collected. Items whose answer in an already-collected
batch was an error or was rejected end, on resume, as the calls recorded for them say
(not re-sent).

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
from collections.abc import Awaitable, Callable
from datetime import UTC
from decimal import Decimal
from typing import Any, Protocol

from automator import Item, ModelError, QuarantineItem
from automator.engine.calls import Caller, describe_error
from automator.engine.context import RunContext
from automator.history.protocols import ModelCallStore
from automator.history.states import CallStatus
from automator.llm.calls import Answer, ModelCalls, Reply
from automator.spec.models import RetryPolicy
from automator_standard.openai_batch_jsonl import (
    ENDPOINT,
    Job,
    Request,
    chat_completion,
    custom_id,
    error_message,
    split,
    why_missing,
)
from automator_standard.openai_client import TransientModelError, failure, reply_from
from automator_standard.openai_config import OpenAITransformConfig
from automator_standard.openai_prompt import Prompt, repair_turns, request_key

# The Batch API's limits per input file; patched smaller by tests
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
COMPLETION_WINDOW = "24h"
TERMINAL = ("completed", "failed", "expired", "cancelled")
LIST_PAGE = 100  # batches per page when looking for one this run already created (the API's maximum)
# batches listed newest first; the search stops at those created this long before the run started
LIST_CLOCK_SLACK_S = 600
REPAIR_CONCURRENCY = 16

_UNSET: Any = object()


class ModelStep(Protocol):
    """What batch mode uses of the step (``openai.transform``): its prompt, checks, sync path and calls."""

    config: OpenAITransformConfig
    context: RunContext
    step_id: str
    calls: ModelCalls

    @property
    def reads_cache(self) -> bool: ...
    @property
    def retry(self) -> RetryPolicy: ...
    @property
    def structured(self) -> bool: ...
    async def client(self) -> Any: ...
    def prompt(self, item: Item) -> Prompt: ...
    def count(self, prompt: Prompt, messages: list[dict[str, Any]]) -> int: ...
    def check_fits(self, prompt_tokens: int) -> None: ...
    def params(self, messages: list[dict[str, Any]]) -> dict[str, Any]: ...
    def judge(self, reply: Reply) -> tuple[str, str]: ...
    def result(self, item: Item, content: str | None) -> Any: ...
    async def ask(
        self,
        item: Item,
        prompt: Prompt,
        prompt_tokens: int,
        *,
        messages: list[dict[str, Any]] | None = None,
        first_repair: int = 0,
        attempt: int = 0,
        key: str | None = None,
    ) -> Answer: ...


class BatchTransform:
    """All of one step's items through the Batch API; ``run(items)`` gives one outcome per item."""

    def __init__(self, step: ModelStep) -> None:
        self.step = step
        self.calls = step.calls
        self.context = step.context
        self.history: ModelCallStore = step.context.history.model_calls
        self.outcomes: list[Any] = []
        self._known: set[str] = set()  # batch ids the history has for this run and step
        # rows of batches a crashed process was creating, by input digest: the batch may exist
        self._intents: dict[str, int] = {}
        info = step.context.info
        # a resumed run may have created a batch whose row never got written
        self.resumed = info.resumed or info.trigger == "resume"

    # -- the whole step ----------------------------------------------------------------

    async def run(self, items: list[Item]) -> list[Any]:
        step = self.step
        await step.client()
        self.outcomes = [_UNSET] * len(items)
        stored = await asyncio.to_thread(self.history.run_batches, self.context.run_id, step.step_id)
        resuming = bool(stored)
        requests: list[Request] = []
        # a resumed run reads the answers its predecessor collected, whatever the temperature
        reads_cache = step.reads_cache or resuming or self.resumed
        for index, item in enumerate(items):
            try:
                request = self._request(index, item)
                cached = (
                    await self.calls.lookup(request.key, this_run_only=not step.reads_cache) if reads_cache else None
                )
            except Exception as exc:  # noqa: BLE001 - this item's outcome; the others go on
                self.outcomes[index] = exc
                continue
            if cached is not None:
                await self.calls.record_cached(item.seq, cached)
                self.outcomes[index] = step.result(item, cached["content"])
            else:
                requests.append(request)
        leaders, followers = self._dedupe(requests)
        self._known = {row.batch_id for row in stored if row.batch_id}
        self._intents = {row.input_sha256: row.id for row in stored if row.status == "creating" and row.input_sha256}
        jobs, fresh, settled = self._reattach(stored, leaders)
        fresh += await self._ended_before(settled)
        jobs += await self._submit(fresh)
        await self._wait(jobs)
        for request, leader in followers:
            await self._follow(request, leader)
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

    async def _follow(self, request: Request, leader: Request) -> None:
        # the leader's answer is kept on its request: the response cache may be written
        # (and its pending entries gone) by the time the followers look
        outcome = self.outcomes[leader.index]
        if isinstance(outcome, BaseException) or leader.answer is None:
            self.outcomes[request.index] = outcome
            return
        await self.calls.record_cached(request.item.seq, leader.answer)
        self.outcomes[request.index] = self.step.result(request.item, leader.answer["content"])

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
            if row.status == "creating":
                continue  # maybe never created: its requests are submitted again, adopting it if it was
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
        last = await asyncio.to_thread(self.history.last_calls, self.context.run_id, self.step.step_id)
        note = "(answered in a batch before the run was resumed; not sent again)"
        again: list[Request] = []
        for request in requests:
            status, error = last.get(request.item.seq, ("", None))
            if status == CallStatus.ERROR:
                self.outcomes[request.index] = ModelError(f"{error} {note}", retryable=False)
            elif status == CallStatus.REJECTED:
                self.outcomes[request.index] = QuarantineItem(
                    f"{self.step.config.model} gave no acceptable answer: {error} {note}"
                )
            else:
                again.append(request)
        return again

    async def _submit(self, requests: list[Request]) -> list[Job]:
        step = self.step
        affordable: list[Request] = []
        for request in requests:
            bound = self.calls.upper_bound(request.prompt_tokens, step.config.max_output_tokens, batch=True)
            try:
                self.calls.reserve(bound)
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
        row_id = self._intents.pop(digest, None)
        # a crashed process may have created it (an intent row says it was about to)
        batch = await self._adopt(metadata) if self.resumed or row_id is not None else None
        if row_id is None:
            # write-ahead: the intent is durable before the batch can be created (and billed)
            row_id = await asyncio.to_thread(
                self.history.add_batch,
                run_id=run_id,
                workflow=self.context.workflow.name,
                step_id=step.step_id,
                model=step.config.model,
                batch_id=None,
                input_file_id=None,
                input_sha256=digest,
                status="creating",
                request_count=len(members),
                requests={r.custom_id: r.key for r in members},
            )
        if batch is None:
            batch = await self._upload_and_create(content, metadata)
        else:
            self.calls.stats["adopted"] += 1
        self._known.add(batch.id)
        await asyncio.to_thread(
            self.history.update_batch, row_id, batch_id=batch.id, input_file_id=batch.input_file_id, status=batch.status
        )
        self.calls.stats["batches"] += 1
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

    async def _api(self, doing: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """One Batch/Files API call, transient failures retried under the step's ``retry:`` policy."""

        async def once() -> Any:
            started = time.monotonic()
            try:
                return await call()
            except Exception as exc:
                failed = failure(exc, int((time.monotonic() - started) * 1000))
                if failed is None:
                    raise
                if not failed.retryable:
                    raise ModelError(f"{doing}: {failed.message}", retryable=False) from None
                raise TransientModelError(f"{doing}: {failed.message}", failed.retry_after) from None

        try:
            return await Caller(retry=self.step.retry, timeout=None, blocking=False).call(once)
        except ModelError as exc:
            raise ModelError(exc.message, retryable=False) from None

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
                    await self._give_up(job, exc.message)
                    waiting.remove(job)
                    continue
                if batch.status != job.status:
                    job.status = batch.status
                    await asyncio.to_thread(self.history.update_batch, job.row_id, status=batch.status)
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
        await asyncio.to_thread(self.history.update_batch, job.row_id, status="collected", error=error)

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
            await self._give_up(job, f"batch {job.batch_id} {batch.status}, results unreadable: {describe_error(exc)}")
            return
        latency_ms = int((time.monotonic() - job.created) * 1000)
        missing = why_missing(batch)
        repairs: list[tuple[Request, Reply, str]] = []
        # each answer's record; gathered, so they share commits
        records: list[Awaitable[None]] = []
        for request in job.requests:
            line = lines.get(request.custom_id)
            if line is None:
                self._settle(request, Decimal(0))
                records.append(self._fail(request, f"no answer in batch {job.batch_id}: {missing}"))
                continue
            response = line.get("response") or {}
            status = response.get("status_code")
            if status != 200:
                self._settle(request, Decimal(0))
                records.append(
                    self._fail(request, f"the Batch API answered {status or 'an error'}: {error_message(line)}")
                )
                continue
            try:
                reply = reply_from(
                    chat_completion().model_validate(response.get("body")),
                    headers={},
                    request_id=response.get("request_id"),
                    latency_ms=latency_ms,
                )
            except ValueError as exc:
                self._settle(request, Decimal(0))
                records.append(self._fail(request, f"the batch's answer could not be read: {describe_error(exc)}"))
                continue
            self._settle(request, self.calls.cost_of(reply, batch=True))
            self.calls.stats["calls"] += 1
            problem, text = self.step.judge(reply)
            if problem:
                repairs.append((request, reply, problem))
            else:
                records.append(self._accept(request, reply, text))
        await asyncio.gather(*records)
        # answers reach the response cache before the batch counts as collected: a process
        # that dies in between finds them there when the run is resumed
        await self._repair_all(repairs)
        await asyncio.to_thread(
            self.history.update_batch,
            job.row_id,
            status="collected",
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            error=None if batch.status == "completed" else f"{batch.status}: {missing}",
        )

    def _settle(self, request: Request, cost: Decimal) -> None:
        self.calls.settle(request.reserved, cost)
        request.reserved = Decimal(0)

    async def _fail(self, request: Request, reason: str) -> None:
        await self.calls.record(request.item.seq, 1, reply=None, status=CallStatus.ERROR, mode="batch", error=reason)
        self.outcomes[request.index] = ModelError(reason, retryable=False)

    async def _accept(self, request: Request, reply: Reply, text: str) -> None:
        answer = self.calls.answer(reply, text)
        await self.calls.record(
            request.item.seq,
            1,
            reply=reply,
            status=CallStatus.OK,
            mode="batch",
            prompt=request.prompt.messages,
            response=reply.content,
            request_key=request.key,
            answer=answer,
        )
        await self._answered(request, answer)

    async def _answered(self, request: Request, answer: Answer) -> None:
        request.answer = answer
        await self.calls.store(request.key, answer)  # already there when its call wrote it
        self.outcomes[request.index] = self.step.result(request.item, answer["content"])

    async def _repair_all(self, repairs: list[tuple[Request, Reply, str]]) -> None:
        """Rejected batch answers: re-asked now through the sync path, or quarantined (max_repairs: 0)."""
        limit = asyncio.Semaphore(REPAIR_CONCURRENCY)

        async def repair(request: Request, reply: Reply, problem: str) -> None:
            step = self.step
            await self.calls.record(
                request.item.seq,
                1,
                reply=reply,
                status=CallStatus.REJECTED,
                mode="batch",
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
                    answer = await step.ask(
                        request.item,
                        request.prompt,
                        request.prompt_tokens,
                        messages=messages,
                        first_repair=1,
                        attempt=1,
                        key=request.key,
                    )
            except Exception as exc:  # noqa: BLE001 - quarantined, failed or over budget: this item's outcome
                self.outcomes[request.index] = exc
                return
            await self._answered(request, answer)

        await asyncio.gather(*(repair(*entry) for entry in repairs))
