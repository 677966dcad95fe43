"""webhook.deliver: POST each item as JSON, retried, with an idempotency key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import httpx
from pydantic import Field

from automator import DeliverStep, Duration, Item, StepConfig, hookimpl
from automator_standard.http_errors import raise_for_status, transport_error


class WebhookDeliverConfig(StepConfig):
    url: str = Field(description="Where to send each item; templates allowed (secrets too).")
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers; templates allowed.")
    body: Any = Field(None, description="The JSON body, a structure of templates; default: the item itself.")
    idempotency_header: str | None = Field(
        "Idempotency-Key", description="Header carrying a key stable across retries and resumed runs; null for none."
    )
    timeout: Duration = Field(timedelta(seconds=30), description="Per request.")


class WebhookDeliver(DeliverStep[WebhookDeliverConfig]):
    name = "webhook.deliver"
    description = "POST each item as JSON to a webhook, with retries and an idempotency key."
    default_concurrency = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.AsyncClient | None = None
        self._sent = 0
        self._host: str | None = None

    async def deliver(self, item: Item) -> None:
        cfg = self.config
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=cfg.timeout.total_seconds())
        url = self.render_text(cfg.url, item)
        headers = {k: self.render_text(v, item) for k, v in cfg.headers.items()}
        if cfg.idempotency_header:
            headers[cfg.idempotency_header] = self.idempotency_key(item)
        body = item.data if cfg.body is None else self.render(cfg.body, item)
        try:
            response = await self._client.request(cfg.method, url, json=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc, cfg.method, url, cfg.timeout.total_seconds()) from None
        raise_for_status(response, cfg.method, url)
        self._sent += 1
        self._host = httpx.URL(url).host

    def summary(self) -> str | None:
        return f"sent {self._sent} items to {self._host}" if self._sent else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


@hookimpl
def register_step_types(register: Any) -> None:
    register(WebhookDeliver)
