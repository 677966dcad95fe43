"""http.fetch: items from an HTTP(S) endpoint answering JSON, text, or an RSS/Atom feed.

With ``paginate:`` it reads page after page (see http_pages), each page's items going
into the run before the next page is asked for, with a checkpoint after each page so a
resumed run goes on from the page it had reached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from automator import Checkpoint, Duration, FetchStep, StepConfig, StepError, hookimpl
from automator_standard._paths import as_item_list, dig
from automator_standard.http_errors import raise_for_status, transport_error, with_params
from automator_standard.http_pages import Pager, Paginate

log = logging.getLogger(__name__)


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
    timeout: Duration = Field(timedelta(seconds=30), description="For the whole request (each page's).")
    verify_tls: bool = True
    paginate: Paginate | None = Field(
        None,
        description="Read page after page: how the next page is found, and at most how many. Left out, one request.",
    )

    @model_validator(mode="after")
    def _pages_fit_the_format(self) -> HttpFetchConfig:
        if self.paginate is None:
            return self
        style = self.paginate.style
        # "field": the key the loader shows the problem at
        if self.paginate.reads_body and self.format not in ("auto", "json"):
            raise PydanticCustomError(
                "paginate_format",
                "{format} has no JSON document to find paginate.{style} in: use json (or auto)",
                {"field": "format", "format": self.format, "style": style},
            )
        if self.paginate.counts_items and self.format == "text":
            raise PydanticCustomError(
                "paginate_format",
                "text makes one item of each page, so paginate.{style} never sees the empty page that ends it",
                {"field": "format", "style": style},
            )
        return self


class HttpFetch(FetchStep[HttpFetchConfig]):
    name = "http.fetch"
    description = "Fetch items from an HTTP(S) endpoint (JSON, text, lines, RSS/Atom)."

    _pager: Pager | None = None  # the pages this step's fetch read, for its summary

    async def fetch(self) -> AsyncIterator[Any]:
        cfg = self.config
        url = self.render_text(cfg.url)
        # the same headers and body with every page: a token is needed on page 2 as on page 1
        request: dict[str, Any] = {"headers": {k: self.render_text(v) for k, v in cfg.headers.items()}}
        if cfg.body is not None:
            request["json"] = self.render(cfg.body)
        seconds = cfg.timeout.total_seconds()
        try:
            first = with_params(url, self.render(cfg.params))
        except httpx.InvalidURL as exc:
            raise transport_error(exc, cfg.method, url, seconds) from None
        async with httpx.AsyncClient(timeout=seconds, verify=cfg.verify_tls, follow_redirects=True) as client:
            if cfg.paginate is None:
                response = await self._request(client, first, url, request)
                for item in self._read(response)[0]:
                    yield item
                return
            self._pager = pager = Pager(cfg.paginate, first, clean=self._clean)
            if self.resume_from is not None:
                pager.resume(self.resume_from)
            while (target := pager.url()) is not None:
                shown = str(target) if pager.pages == 0 else f"{target} (page {pager.pages + 1})"
                response = await self._request(client, target, shown, request)
                items, document = self._read(response)
                for item in items:
                    yield item
                pager.read(response, items, document)
                state = pager.state()
                if state is not None:  # None: a secret in it; a resumed run goes on from the checkpoint before
                    yield Checkpoint(state)
            if pager.capped:
                log.warning(
                    "%s: step %s stopped after %d pages (paginate.max_pages); the server has more",
                    self.context.workflow.name,
                    self.step_id,
                    pager.pages,
                )

    async def _request(
        self, client: httpx.AsyncClient, target: httpx.URL, shown: str, request: dict[str, Any]
    ) -> httpx.Response:
        """One page; ``shown`` names it in errors (the run's redactor takes secrets out of those)."""
        method = self.config.method
        try:
            response = await client.request(method, target, **request)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc, method, shown, self.config.timeout.total_seconds()) from None
        raise_for_status(response, method, shown)
        return response

    def _clean(self, text: str) -> bool:
        return self.context.redactor.text(text) == text

    def summary(self) -> str | None:
        pager = self._pager
        if pager is None:
            return None
        read = f"{pager.pages} page{'s' if pager.pages != 1 else ''}"
        if pager.capped:
            return f"{read}; stopped at paginate.max_pages ({pager.settings.max_pages}), the server has more"
        return read

    def _read(self, response: httpx.Response) -> tuple[list[Any], Any]:
        """The page's items, and its JSON document (None for other formats)."""
        fmt = self.config.format
        content_type = response.headers.get("content-type", "")
        if fmt == "auto" and self.config.paginate is not None and self.config.paginate.reads_body:
            fmt = "json"  # the next page is named in the JSON document, whatever its content type says
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
            return as_item_list(dig(document, self.config.items, what=what), what=what), document
        if fmt == "lines":
            return [{"line": line} for line in response.text.splitlines() if line.strip()], None
        if fmt == "feed":
            return _feed_items(response.content), None
        return [{"text": response.text, "status": response.status_code, "url": str(response.request.url)}], None


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
