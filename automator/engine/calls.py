"""Calling a step's method: sync or async, in a thread if it blocks, with timeout and retry."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from automator.errors import ItemSignal, StepError
from automator.spec.models import RetryPolicy


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ItemSignal | asyncio.CancelledError):
        return False
    if isinstance(exc, StepError):
        return exc.retryable
    return isinstance(exc, Exception)


def _retry_after(exc: BaseException | None) -> float | None:
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


@dataclass
class Caller:
    """Calls one step method under one step's retry policy, timeout and blocking flag."""

    retry: RetryPolicy
    timeout: timedelta | None
    blocking: bool
    retries: int = 0
    # told about each failed attempt that will be retried (fetch steps record each attempt)
    on_failed_attempt: Callable[[BaseException], None] | None = None

    def _backoff(self, attempt: int, exc: BaseException | None) -> float:
        # exponential, with full jitter on the upper half so many items do not retry in lockstep
        server_says = _retry_after(exc)
        if server_says is not None:
            return min(server_says, self.retry.max_backoff.total_seconds())
        base = self.retry.backoff.total_seconds() * (2 ** max(attempt - 1, 0))
        capped = min(base, self.retry.max_backoff.total_seconds())
        return capped * random.uniform(0.5, 1.0)

    def backoff(self, attempt: int, exc: BaseException | None) -> float:
        """How long to wait before try ``attempt + 1`` (the server's Retry-After, if it said)."""
        return self._backoff(attempt, exc)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return self._backoff(state.attempt_number + 1, exc)

    def _failed_attempt(self, exc: BaseException | None) -> None:
        if self.on_failed_attempt is not None and exc is not None:
            self.on_failed_attempt(exc)

    def _before_sleep(self, state: RetryCallState) -> None:
        self._failed_attempt(state.outcome.exception() if state.outcome else None)

    async def _once(self, method: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        seconds = self.timeout.total_seconds() if self.timeout else None
        if inspect.iscoroutinefunction(method):
            async with asyncio.timeout(seconds):
                return await method(*args)
        if self.blocking:
            async with asyncio.timeout(seconds):
                return await asyncio.to_thread(method, *args)
        result = method(*args)
        if inspect.isawaitable(result):
            async with asyncio.timeout(seconds):
                return await result
        return result

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Try once; on a retryable failure, back off and try again up to the policy's limit."""
        try:
            return await self._once(method, args)
        except Exception as first:  # noqa: BLE001 - re-raised unless a retry may help
            return await self.retry_after_failure(method, args, first)

    async def retry_after_failure(self, method: Callable[..., Any], args: tuple[Any, ...], failure: Exception) -> Any:
        """After a first failed attempt: back off and try again, or re-raise ``failure``."""
        if self.retry.attempts <= 1 or not is_retryable(failure):
            raise failure
        self.retries += 1
        self._failed_attempt(failure)
        await asyncio.sleep(self._backoff(1, failure))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts - 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                return await self._once(method, args)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


def describe_error(exc: BaseException) -> str:
    """A one-line account of an error for the history: type and message, no traceback.

    Never empty: an exception without a message is named by its type, and its cause (the
    driver's or the socket's error a library wrapped) is added when it says more.
    """
    if isinstance(exc, TimeoutError):
        text = str(exc).strip()
        return f"timed out: {text}" if text else "timed out"
    if isinstance(exc, StepError):
        return exc.message.strip() or _with_cause(type(exc).__name__, exc)
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else _with_cause(name, exc)


def _with_cause(name: str, exc: BaseException) -> str:
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return f"{name} (caused by {describe_error(cause)})" if cause is not None else name
