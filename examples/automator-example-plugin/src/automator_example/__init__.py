"""An example automator plugin: a JSON Feed fetcher, a chat deliverer, a filter, secrets.

Registered through the entry point ``example`` in the group ``automator`` (see
pyproject.toml); every name it adds starts with ``example`` so it never clashes with
other plugins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, HttpUrl

from automator import DeliverStep, FetchStep, Item, StepConfig, StepError, Templated, hookimpl

__version__ = "0.1.0"

SECRETS_FILE_VARIABLE = "AUTOMATOR_EXAMPLE_SECRETS_FILE"


# --- example.jsonfeed: an async fetcher -------------------------------------------------


class JsonFeedConfig(StepConfig):
    url: HttpUrl = Field(description="The JSON Feed (https://jsonfeed.org) to read.")
    # Templated: a number, or a template such as "{{ params.limit }}" rendered before fetch() runs
    limit: Templated[int] = Field(50, ge=1, le=1000, description="Read at most this many of the newest items.")
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the server.")


class JsonFeed(FetchStep[JsonFeedConfig]):
    name = "example.jsonfeed"
    description = "Fetch the items of a JSON Feed."

    async def fetch(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=self.config.timeout) as client:
            response = await client.get(str(self.config.url))
        if response.status_code >= 400:
            # 5xx and 429 may pass; a 404 will not
            retryable = response.status_code >= 500 or response.status_code == 429
            raise StepError(f"{self.config.url} answered {response.status_code}", retryable=retryable)
        try:
            items = response.json()["items"]
        except (ValueError, KeyError, TypeError):
            raise StepError(f"{self.config.url} is not a JSON Feed (no items list)", retryable=False) from None
        return list(items)[: self.config.limit]


# --- example.chat: a blocking deliverer --------------------------------------------------


class ChatConfig(StepConfig):
    url: str = Field(description="The chat's incoming-webhook URL (a template; usually a secret).")
    text: str = Field(description="The message, a template: 'New: {{ item.title }}'.")


class Chat(DeliverStep[ChatConfig]):
    name = "example.chat"
    description = "Post one chat message per item to an incoming webhook."
    blocking = True  # plain httpx calls block: automator runs them in worker threads
    default_concurrency = 4

    def deliver(self, item: Item) -> None:
        url = self.render_text(self.config.url, item)
        text = self.render_text(self.config.text, item)
        # the key automator's own deliverers send: the same for this item in every attempt and
        # run, so the chat can drop a message that a retried or resumed run sends again
        headers = {"Idempotency-Key": self.idempotency_key(item)}
        try:
            response = httpx.post(url, json={"text": text}, headers=headers, timeout=10.0)
        except httpx.TransportError as exc:
            raise StepError(f"chat webhook unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise StepError(f"chat webhook answered {response.status_code}", retryable=response.status_code >= 500)


# --- a template filter and a secrets provider --------------------------------------------


def shorten(text: str, width: int = 80) -> str:
    """``{{ item.title | example_shorten(40) }}``: at most ``width`` characters, with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)].rstrip() + "…"


def _secrets_file() -> dict[str, str]:
    path = os.environ.get(SECRETS_FILE_VARIABLE)
    if not path:
        return {}
    return {str(k): str(v) for k, v in json.loads(Path(path).read_text(encoding="utf-8")).items()}


# --- the hooks -------------------------------------------------------------------------


@hookimpl
def register_step_types(register: Callable[[type], None]) -> None:
    register(JsonFeed)
    register(Chat)


@hookimpl
def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("example_shorten", shorten)


@hookimpl
def get_secret(name: str) -> str | None:
    # None when the variable is unset: other providers and the environment answer then
    return _secrets_file().get(name)
