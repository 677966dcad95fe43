"""One chat completion over the official SDK, and what its failures mean.

The SDK's own retries are off (``max_retries=0``): every attempt, failed or not, is
recorded with its tokens and cost, and the step retries under its workflow ``retry:``
policy (honouring ``retry-after``), the one policy every step follows.
"""

from __future__ import annotations

import email.utils
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openai

from automator.engine.calls import describe_error
from automator.errors import ModelError, StepError
from automator.llm.calls import Reply

RETRYABLE_STATUS = {408, 409, 429}


class CallFailed(Exception):  # noqa: N818 - one failed attempt, classified
    """One failed request: its message, whether trying again may help, and what the server said."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        latency_ms: int = 0,
        headers: dict[str, str] | None = None,
        too_long: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id
        self.latency_ms = latency_ms
        self.headers = headers or {}
        self.too_long = too_long


class TransientModelError(ModelError):
    """One request failed in a way another attempt may fix (429, 5xx, a timeout); ``retry_after`` from the server."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message, retryable=True)
        self.retry_after = retry_after


def make_client(*, api_key: str | None, base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    import openai  # imported when first needed: it costs CLI start-up time

    try:
        return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
    except openai.OpenAIError as exc:
        raise StepError(
            f"cannot set up the OpenAI client: {describe_error(exc)}",
            retryable=False,
            hint="export OPENAI_API_KEY, or give api_key: '{{ secrets.NAME }}' in the step",
        ) from None


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
    return exc.message


def failure(exc: Exception, latency_ms: int = 0) -> CallFailed | None:
    """What a failed SDK call means (retryable or not); None for an exception that is not the API's."""
    import openai  # imported when first needed: it costs CLI start-up time

    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        if isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict):
            code = exc.body["error"].get("code", code)
        return CallFailed(
            f"the API answered {status}: {_error_text(exc)}",
            retryable=status >= 500 or status in RETRYABLE_STATUS,
            status=status,
            retry_after=retry_after(exc.response.headers),
            request_id=exc.request_id,
            latency_ms=latency_ms,
            headers=dict(exc.response.headers),
            too_long=code == "context_length_exceeded",
        )
    if isinstance(exc, openai.APITimeoutError):
        return CallFailed("the request timed out", retryable=True, latency_ms=latency_ms)
    if isinstance(exc, openai.APIConnectionError):
        # the cause (httpx's ConnectError, say) often has an empty str(): its type is named too
        cause = exc.__cause__ or exc
        return CallFailed(f"cannot reach the API: {describe_error(cause)}", retryable=True, latency_ms=latency_ms)
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        return CallFailed(
            f"the API's answer could not be read: {describe_error(exc)}", retryable=True, latency_ms=latency_ms
        )
    return None


def reply_from(completion: Any, *, headers: dict[str, str], request_id: str | None, latency_ms: int) -> Reply:
    """A Reply from a parsed ChatCompletion (a sync answer, or one line of a batch's output)."""
    usage = completion.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    choice = completion.choices[0] if completion.choices else None
    message = choice.message if choice else None
    return Reply(
        content=message.content if message else None,
        refusal=getattr(message, "refusal", None) if message else None,
        finish_reason=choice.finish_reason if choice else None,
        input_tokens=usage.prompt_tokens if usage else 0,
        cached_input_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
        output_tokens=usage.completion_tokens if usage else 0,
        request_id=request_id,
        latency_ms=latency_ms,
        headers=headers,
        model=completion.model,
    )


async def complete(client: openai.AsyncOpenAI, params: dict[str, Any]) -> Reply:
    """Send one chat completion; raises CallFailed, classified retryable or not."""
    import openai  # imported when first needed: it costs CLI start-up time

    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        raw = await client.chat.completions.with_raw_response.create(**params)
        completion = raw.parse()
    except (openai.OpenAIError, ValueError) as exc:
        failed = failure(exc, elapsed())
        if failed is None:
            raise
        raise failed from None
    return reply_from(
        completion, headers=dict(raw.headers), request_id=raw.headers.get("x-request-id"), latency_ms=elapsed()
    )
