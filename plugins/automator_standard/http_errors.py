"""HTTP failures as step errors: which are worth retrying, and what to tell the user."""

from __future__ import annotations

from typing import Any

import httpx

from automator import StepError
from automator.engine.calls import describe_error
from automator.redaction import process_redactor

RETRYABLE_STATUS = {408, 409, 425, 429}


class HttpStatusError(StepError):
    def __init__(self, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(message, retryable=status >= 500 or status in RETRYABLE_STATUS)
        self.status = status
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def raise_for_status(response: httpx.Response, method: str, url: str) -> None:
    if response.status_code < 400:
        return
    # secrets out before the cut: half a secret cut at 200 characters would not be recognised
    body = (process_redactor().text(response.text) or "")[:200].replace("\n", " ").strip()
    detail = f": {body}" if body else ""
    raise HttpStatusError(
        f"{method} {url} answered {response.status_code} {response.reason_phrase}{detail}",
        status=response.status_code,
        retry_after=_retry_after(response),
    )


def with_params(url: str, params: dict[str, Any] | None) -> httpx.URL:
    """The url with ``params`` added to its own query (httpx's ``params=`` would replace it).

    A name in both takes the value from ``params``; without params the url is sent as written.
    """
    target = httpx.URL(url)
    return target.copy_merge_params(params) if params else target


def transport_error(exc: httpx.HTTPError | httpx.InvalidURL, method: str, url: str, timeout: float) -> StepError:
    if isinstance(exc, httpx.TimeoutException):
        return StepError(f"{method} {url} timed out after {timeout:g}s")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return StepError(f"{method} {url}: {str(exc).strip() or type(exc).__name__}", retryable=False)
    # httpx's errors often have no text of their own (a reset connection): name the type then
    return StepError(f"{method} {url} failed: {describe_error(exc)}")
