"""http.fetch: items from an HTTP(S) endpoint answering JSON, text, or an RSS/Atom feed."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Literal

import httpx
from pydantic import Field

from automator import Duration, FetchStep, StepConfig, StepError, hookimpl
from automator_standard._paths import as_item_list, dig
from automator_standard.http_errors import raise_for_status, transport_error, with_params


class HttpFetchConfig(StepConfig):
    url: str = Field(description="The address to fetch; templates allowed.")
    method: Literal["GET", "POST", "PUT", "PATCH"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers; templates allowed.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Query parameters, added to the query the url already has (a name in both: this value).",
    )
    body: Any = Field(None, description="A JSON body to send (with POST, say).")
    format: Literal["auto", "json", "text", "lines", "feed"] = Field(
        "auto", description="How to read the response; auto looks at its content type."
    )
    items: str | None = Field(
        None, description="Dotted path to the list of items in a JSON response, such as data.tickets."
    )
    timeout: Duration = Field(timedelta(seconds=30), description="For the whole request.")
    verify_tls: bool = True


class HttpFetch(FetchStep[HttpFetchConfig]):
    name = "http.fetch"
    description = "Fetch items from an HTTP(S) endpoint (JSON, text, lines, RSS/Atom)."

    async def fetch(self) -> list[Any]:
        cfg = self.config
        url = self.render_text(cfg.url)
        request: dict[str, Any] = {"headers": {k: self.render_text(v) for k, v in cfg.headers.items()}}
        if cfg.body is not None:
            request["json"] = self.render(cfg.body)
        seconds = cfg.timeout.total_seconds()
        async with httpx.AsyncClient(timeout=seconds, verify=cfg.verify_tls, follow_redirects=True) as client:
            try:
                target = with_params(url, self.render(cfg.params))
                response = await client.request(cfg.method, target, **request)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise transport_error(exc, cfg.method, url, seconds) from None
        raise_for_status(response, cfg.method, url)
        return self._items(response)

    def _items(self, response: httpx.Response) -> list[Any]:
        fmt = self.config.format
        content_type = response.headers.get("content-type", "")
        if fmt == "auto":
            if "json" in content_type:
                fmt = "json"
            elif any(kind in content_type for kind in ("rss", "atom", "xml")):
                fmt = "feed"
            else:
                fmt = "json" if self.config.items else "text"
        what = f"{self.config.method} {response.request.url}"
        if fmt == "json":
            try:
                document = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                # secrets out before the cut (half a secret would not be recognised later)
                preview = (self.context.redactor.text(response.text) or "")[:80].replace("\n", " ")
                raise StepError(
                    f"{what}: the response is not JSON (content-type {content_type or 'none'}; starts {preview!r})",
                    retryable=False,
                ) from None
            return as_item_list(dig(document, self.config.items, what=what), what=what)
        if fmt == "lines":
            return [{"line": line} for line in response.text.splitlines() if line.strip()]
        if fmt == "feed":
            return _feed_items(response.content)
        return [{"text": response.text, "status": response.status_code, "url": str(response.request.url)}]


def _feed_items(content: bytes) -> list[dict[str, Any]]:
    import feedparser

    feed = feedparser.parse(content)
    if feed.bozo and not feed.entries:
        raise StepError(f"the response is not an RSS or Atom feed: {feed.bozo_exception}", retryable=False)
    items = []
    for entry in feed.entries:
        items.append(
            {
                "id": entry.get("id") or entry.get("link"),
                "title": entry.get("title"),
                "link": entry.get("link"),
                "summary": entry.get("summary"),
                "published": entry.get("published") or entry.get("updated"),
                "author": entry.get("author"),
            }
        )
    return items


@hookimpl
def register_step_types(register: Any) -> None:
    register(HttpFetch)
