"""``paginate:`` for http.fetch: its settings, and where each next page is.

One style per step: a next link (the ``Link`` header, or a URL in the JSON body), page
numbers, offsets, or a cursor from the body. A :class:`Pager` follows one paginated fetch:
after each page it knows the next page's URL (or that there is none), and its ``state``
says the same as JSON for a ``Checkpoint``; a Pager made from that state (a resumed run)
goes on from there. Secrets stay out of that state: it is kept in the run's ledger.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from automator import StepConfig, StepError
from automator_standard._paths import dig

Style = Literal["link_header", "next_url", "page", "offset", "cursor"]
STYLES: tuple[Style, ...] = ("link_header", "next_url", "page", "offset", "cursor")
DEFAULT_PORTS = {"http": 80, "https": 443}


class PageNumbers(StepConfig):
    param: str = Field("page", description="The query parameter that carries the page number.")
    start: int = Field(1, description="The first page's number (0 for an API that counts from zero).")
    size: int | None = Field(
        None,
        ge=1,
        description="Items on a full page: a page with fewer is the last one (saves a request). "
        "Left out, only an empty page ends the fetch.",
    )


class Offsets(StepConfig):
    param: str = Field(
        "offset", description="The query parameter that carries the offset: 0, then the number of items read so far."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Items per page, sent in limit_param; a page with fewer is the last one. "
        "Left out, none is sent and only an empty page ends the fetch.",
    )
    limit_param: str = Field("limit", description="The query parameter that carries limit.")


class Cursors(StepConfig):
    path: str = Field(
        description="Dotted path to the next page's cursor in the JSON response, such as meta.next_cursor; "
        "absent, null or empty: that page was the last."
    )
    param: str = Field("cursor", description="The query parameter the cursor is sent in.")


class Paginate(StepConfig):
    link_header: bool = Field(
        False, description='Follow the URL the Link response header gives for rel="next" (RFC 8288).'
    )
    next_url: str | None = Field(
        None,
        description="Dotted path to the next page's URL in the JSON response, such as links.next; "
        "absent, null or empty: that page was the last.",
    )
    page: PageNumbers | None = Field(None, description="Ask for page start, start + 1, ... until an empty page.")
    offset: Offsets | None = Field(None, description="Ask for offset 0, then past the items read, until an empty page.")
    cursor: Cursors | None = Field(None, description="Send the cursor each page gives for the next one.")
    max_pages: int = Field(
        100,
        ge=1,
        description="At most this many pages per run: reaching it ends the fetch (not the run) "
        "with a warning in the log and the run summary.",
    )
    other_hosts: bool = Field(
        False,
        description="Follow a next link to another origin (scheme, host, port). Off, such a link fails the "
        "fetch: the headers, a token too, go with every page.",
    )

    @model_validator(mode="after")
    def _one_style(self) -> Paginate:
        chosen = [name for name in STYLES if getattr(self, name) not in (None, False)]
        if not chosen:
            raise ValueError(
                "say where the next page is: link_header: true, next_url, page, offset or cursor (one of them)"
            )
        # "field": the key the loader shows the problem at
        if len(chosen) > 1:
            raise PydanticCustomError(
                "paginate_styles",
                "cannot be combined with {other}: one pagination style per step",
                {"field": chosen[1], "other": chosen[0]},
            )
        if self.other_hosts and chosen[0] not in ("link_header", "next_url"):
            raise PydanticCustomError(
                "paginate_other_hosts",
                "is about next links (link_header, next_url), not {style}",
                {"field": "other_hosts", "style": chosen[0]},
            )
        return self

    @property
    def style(self) -> Style:
        return next(name for name in STYLES if getattr(self, name) not in (None, False))

    @property
    def reads_body(self) -> bool:
        """The next page is found in the JSON document (not in a header or a count)."""
        return self.style in ("next_url", "cursor")

    @property
    def counts_items(self) -> bool:
        """An empty (or short) page ends the fetch."""
        return self.style in ("page", "offset")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def _optional(document: Any, path: str) -> Any:
    """The value at a dotted path, or None where the document has none: the last page's way of saying so."""
    try:
        return dig(document, path, what="")
    except StepError:
        return None


class Pager:
    """Where the pages of one fetch are: the next page's URL after each page, and its state as JSON.

    ``first`` is the first page's URL (the step's url with its params), rendered for this
    process: a resumed pager adds back the parameters it left out of its state from it.
    ``clean(text)`` is False for text holding a secret (the run's redactor would change it).
    """

    def __init__(self, settings: Paginate, first: httpx.URL, *, clean: Callable[[str], bool]) -> None:
        self.settings = settings
        self.style = settings.style
        self.first = first
        self.clean = clean
        self.pages = 0  # pages read by this fetch, a resumed one's earlier pages too
        self.done = False
        self.capped = False  # ended by max_pages with more pages to come
        # link styles: the next URL; page: its number; offset: its offset; cursor: its cursor (None: none yet)
        self.position: Any = self._start()
        self._seen: set[str] = set()  # next links and cursors followed: one seen again is a loop
        self._last_page: str | None = None  # a digest of the last page's items, for page and offset

    def _start(self) -> Any:
        if self.style in ("link_header", "next_url"):
            return str(self.first)
        if self.settings.page is not None:
            return self.settings.page.start
        return 0 if self.style == "offset" else None

    # -- resuming ---------------------------------------------------------------------

    def resume(self, state: Any) -> None:
        """Go on from a checkpoint's state (see :meth:`state`)."""
        ok = isinstance(state, dict) and state.get("style") == self.style and isinstance(state.get("pages"), int)
        position = state.get("next") if ok else None
        if ok and position is not None:
            expected = {"link_header": str, "next_url": str, "page": int, "offset": int, "cursor": str | int}
            ok = isinstance(position, expected[self.style]) and not isinstance(position, bool)
        if not ok:
            raise StepError(
                f"cannot go on from the run's checkpoint {json.dumps(state, default=str)[:200]}: it was not "
                f"written for paginate: {self.style} (was the workflow's paginate: changed?)",
                retryable=False,
            )
        self.pages = state["pages"]
        self.done = position is None
        if self.style in ("link_header", "next_url") and position is not None:
            position = str(self._with_first(httpx.URL(position), state.get("from_first") or []))
        self.position = position

    # -- the next page ----------------------------------------------------------------

    def url(self) -> httpx.URL | None:
        """The next page's URL; None when the fetch is over."""
        if self.done:
            return None
        style, position = self.style, self.position
        if style in ("link_header", "next_url"):
            return httpx.URL(position)
        if style == "page":
            assert self.settings.page is not None
            return self.first.copy_merge_params({self.settings.page.param: position})
        if style == "offset":
            offsets = self.settings.offset
            assert offsets is not None
            sent: dict[str, Any] = {offsets.param: position}
            if offsets.limit is not None:
                sent[offsets.limit_param] = offsets.limit
            return self.first.copy_merge_params(sent)
        assert self.settings.cursor is not None
        return self.first if position is None else self.first.copy_merge_params({self.settings.cursor.param: position})

    def read(self, response: httpx.Response, items: list[Any], document: Any) -> None:
        """Take in the page just read (its items; its JSON document, or None): where the next one is.

        Raises StepError for a next link or cursor seen before (a loop), a next link to
        another origin (unless other_hosts), and a page the same as the one before.
        """
        self.pages += 1
        if self.position is not None and self.style in ("link_header", "next_url", "cursor"):
            self._seen.add(str(self.position))
        following = self._next(response, items, document)
        if following is None:
            self.done = True
        elif self.pages >= self.settings.max_pages:
            self.done = self.capped = True
        else:
            self.position = following

    def _next(self, response: httpx.Response, items: list[Any], document: Any) -> Any:
        style = self.style
        if style in ("link_header", "next_url"):
            if style == "link_header":
                link = response.links.get("next", {}).get("url")
            else:
                assert self.settings.next_url is not None
                link = _optional(document, self.settings.next_url)
                if link is not None and not isinstance(link, str):
                    raise StepError(
                        f"page {self.pages}: the next page's URL at {self.settings.next_url} is "
                        f"{type(link).__name__}, not text",
                        retryable=False,
                    )
            if not link:
                return None
            following = response.url.join(link)
            if not self.settings.other_hosts and _origin(following) != _origin(self.first):
                raise StepError(
                    f"page {self.pages} links to the next page at another host ({following}): not followed, since "
                    "the step's headers (a token too) go with every page; paginate.other_hosts: true follows it",
                    retryable=False,
                )
            return self._unseen(str(following), "link")
        if style == "cursor":
            cursors = self.settings.cursor
            assert cursors is not None
            cursor = _optional(document, cursors.path)
            if cursor is None or cursor == "":
                return None
            if not isinstance(cursor, str | int) or isinstance(cursor, bool):
                raise StepError(
                    f"page {self.pages}: the cursor at {cursors.path} is {type(cursor).__name__}, not text",
                    retryable=False,
                )
            return self._unseen(cursor, "cursor")
        # page numbers and offsets: the items say whether there is more
        counted = self.settings.page or self.settings.offset
        assert counted is not None
        full = counted.size if isinstance(counted, PageNumbers) else counted.limit
        if not items or (full is not None and len(items) < full):
            return None
        digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
        if digest == self._last_page:
            # a misspelt parameter: the server sends its first page again and again, up to max_pages
            raise StepError(
                f"page {self.pages} has the same items as page {self.pages - 1}: the server seems to ignore "
                f"the {counted.param!r} parameter, so the fetch stops here",
                retryable=False,
            )
        self._last_page = digest
        return self.position + 1 if style == "page" else self.position + len(items)

    def _unseen(self, following: Any, what: str) -> Any:
        if str(following) in self._seen:
            raise StepError(
                f"page {self.pages} gives as the next page's {what} {following}, one already fetched: the server's "
                "pages go round in a loop, so the fetch stops here",
                retryable=False,
            )
        return following

    # -- the state for a checkpoint ---------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        """Where the next page starts, as JSON; None when that would put a secret into the ledger."""
        state: dict[str, Any] = {"style": self.style, "pages": self.pages, "next": None if self.done else self.position}
        if self.style in ("link_header", "next_url") and not self.done:
            # the parameters the first page had too (an api_key a server repeats in its links) are
            # left out, and added back from the step's settings when the run is resumed
            link, from_first = self._without_first(httpx.URL(self.position))
            state["next"] = str(link)
            if from_first:
                state["from_first"] = from_first
        return state if self.clean(json.dumps(state)) else None

    def _without_first(self, link: httpx.URL) -> tuple[httpx.URL, list[str]]:
        sent = set(self.first.params.multi_items())
        pairs = link.params.multi_items()
        dropped = sorted({name for name, value in pairs if (name, value) in sent})
        if not dropped:
            return link, []  # as the server wrote it
        kept: list[tuple[str, Any]] = [pair for pair in pairs if pair not in sent]
        return link.copy_with(params=httpx.QueryParams(kept)), dropped

    def _with_first(self, link: httpx.URL, names: list[str]) -> httpx.URL:
        if not names:
            return link
        pairs: list[tuple[str, Any]] = link.params.multi_items()
        restored = [(name, value) for name, value in self.first.params.multi_items() if name in names]
        return link.copy_with(params=httpx.QueryParams([*pairs, *restored]))
