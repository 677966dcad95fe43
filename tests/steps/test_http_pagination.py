"""http.fetch with paginate:, page after page from a real HTTP server on loopback.

Each style (the Link header, a next URL in the body, page numbers, offsets, cursors), the
page cap, the guards (a loop, another host, a page the server sends again), pages going
into the run as they come, and a fetch going on from a checkpoint after a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import Checkpoint, FetchStep, History, StepError, WorkflowFileError, hookimpl
from automator.testing import WorkflowRunner
from tests.conftest import resume_crashed, run_until_killed
from tests.steps.coverage import covers

FETCH = "http.fetch"
TOKEN = "t0ken-s3cret"


class Api:
    """A paginated endpoint: ``answer(request)`` answers each request; ``requests`` keeps them in order."""

    def __init__(self, server: HTTPServer, answer: Callable[[Request], Response], path: str = "/tickets") -> None:
        self.requests: list[Request] = []
        self.url = server.url_for(path)
        self.path = path

        def handle(request: Request) -> Response:
            self.requests.append(request)
            return answer(request)

        server.expect_request(path).respond_with_handler(handle)

    def asked(self, name: str) -> list[str | None]:
        """The value of one query parameter in each request, in order."""
        return [request.args.get(name) for request in self.requests]


def tickets(page: Any, count: int = 2) -> list[dict[str, str]]:
    return [{"id": f"{page}-{n}"} for n in range(count)]


def reply(document: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(document), content_type="application/json", headers=headers)


def workflow(url: str, settings: str, *, top: str = "") -> str:
    """A fetch of ``url`` with ``settings`` (flow-style YAML) in its with:, and a test.deliver after it."""
    return f'{top}\nsteps:\n  - {{id: src, uses: http.fetch, with: {{url: "{url}", {settings}}}}}\n' + (
        "  - {id: out, uses: test.deliver}\n"
    )


def delivered_ids(result: Any) -> list[str]:
    """The delivered ids, sorted: chunks of different pages are delivered in any order."""
    return sorted(item["id"] for item in result.delivered.get("out", []))


def fetch_step(
    runner: WorkflowRunner, url: str, settings: str, *, resume_from: Any, secrets: dict[str, str] | None
) -> FetchStep[Any]:
    step = runner.step(workflow(url, settings), "src", secrets=secrets).step
    assert isinstance(step, FetchStep)
    step.resume_from = resume_from  # as the engine sets it for a resumed run
    return step


def fetched(
    runner: WorkflowRunner,
    url: str,
    settings: str,
    *,
    resume_from: Any = None,
    secrets: dict[str, str] | None = None,
) -> list[Any]:
    """Everything the step's fetch yields (items and checkpoints), driven as the engine drives it."""
    step = fetch_step(runner, url, settings, resume_from=resume_from, secrets=secrets)

    async def drain() -> list[Any]:
        return [value async for value in step.fetch()]

    return asyncio.run(drain())


def fetched_until_it_fails(runner: WorkflowRunner, url: str, settings: str) -> tuple[list[Any], StepError]:
    """What the step's fetch yielded before it raised, and the error."""
    step = fetch_step(runner, url, settings, resume_from=None, secrets=None)
    values: list[Any] = []

    async def drain() -> None:
        async for value in step.fetch():
            values.append(value)

    with pytest.raises(StepError) as caught:
        asyncio.run(drain())
    return values, caught.value


def states(values: list[Any]) -> list[Any]:
    return [value.state for value in values if isinstance(value, Checkpoint)]


def items(values: list[Any]) -> list[str]:
    return [value["id"] for value in values if not isinstance(value, Checkpoint)]


# --- without paginate: one request, as always ------------------------------------------------


@covers(FETCH, "paginate", absent=True)
def test_without_paginate_it_makes_one_request_even_when_the_server_offers_more(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    api = Api(
        httpserver,
        lambda r: reply(
            {"data": tickets(1), "links": {"next": "/tickets?page=2"}}, {"Link": '</tickets?page=2>; rel="next"'}
        ),
    )

    values = fetched(automator_runner, api.url, "items: data")
    result = automator_runner.run(workflow(api.url, "items: data"))

    assert values == tickets(1)  # no checkpoint either: a resumed run fetches it again
    assert result.status == "succeeded", result.error
    assert delivered_ids(result) == sorted(["1-0", "1-1"])
    assert len(api.requests) == 2  # one per fetch
    assert result.step("src").summary is None


# --- the styles ---------------------------------------------------------------------------


@covers(FETCH, "paginate", "paginate.link_header", absent=False)
@covers(FETCH, "paginate.next_url", "paginate.page", "paginate.offset", "paginate.cursor", absent=True)
def test_link_header_follows_rel_next_with_the_headers_on_every_page(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    def answer(request: Request) -> Response:
        page = int(request.args.get("page", "1"))
        links = {
            1: '</tickets?page=2>; rel="next", </tickets?page=9>; rel="last"',  # relative, among others
            2: f'<{httpserver.url_for("/tickets")}?page=3>; rel="next"',  # absolute
        }
        headers = {"Link": links[page]} if page in links else {}
        # a next URL in the body and an empty page mean nothing to this style
        return reply({"data": tickets(page) if page < 3 else [], "links": {"next": "/elsewhere"}}, headers)

    api = Api(httpserver, answer)

    result = automator_runner.run(
        workflow(
            api.url,
            'items: data, headers: {Authorization: "Bearer {{ secrets.TOKEN }}"}, paginate: {link_header: true}',
        ),
        secrets={"TOKEN": TOKEN},
    )

    assert result.status == "succeeded", result.error
    assert delivered_ids(result) == sorted(["1-0", "1-1", "2-0", "2-1"])
    assert api.asked("page") == [None, "2", "3"]
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in api.requests)
    assert all(set(r.args) <= {"page"} for r in api.requests)  # no offset, cursor or page number added
    assert result.step("src").summary == "3 pages"


@covers(FETCH, "paginate.next_url", absent=False)
@covers(FETCH, "paginate.link_header", absent=True)
def test_next_url_takes_the_next_pages_url_from_the_body(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    def answer(request: Request) -> Response:
        page = int(request.args.get("page", "1"))
        following = {1: "/tickets?page=2", 2: f"{httpserver.url_for('/tickets')}?page=3"}.get(page)
        # page 3 has no links at all: the last page; a Link header is not this style's business
        body: dict[str, Any] = {"data": tickets(page)} | ({"links": {"next": following}} if following else {})
        return reply(body, {"Link": '</tickets?page=7>; rel="next"'})

    api = Api(httpserver, answer)

    result = automator_runner.run(workflow(api.url, "items: data, paginate: {next_url: links.next}"))

    assert result.status == "succeeded", result.error
    assert api.asked("page") == [None, "2", "3"]
    assert delivered_ids(result) == sorted([f"{p}-{n}" for p in (1, 2, 3) for n in (0, 1)])


@pytest.mark.parametrize("last", [None, ""], ids=["null", "empty"])
def test_a_null_or_empty_next_url_is_the_last_page(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, last: str | None
) -> None:
    api = Api(httpserver, lambda r: reply({"data": tickets(1), "links": {"next": last}}))

    result = automator_runner.run(workflow(api.url, "items: data, paginate: {next_url: links.next}"))

    assert result.status == "succeeded", result.error
    assert len(api.requests) == 1


@covers(FETCH, "paginate.page", absent=False)
@covers(FETCH, "paginate.page.param", "paginate.page.start", "paginate.page.size", absent=True)
def test_page_numbers_count_from_1_until_an_empty_page(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    # a short page (one item) is not the last one without size: only an empty page is
    pages = {"1": tickets(1), "2": tickets(2, count=1), "3": tickets(3)}
    api = Api(httpserver, lambda r: reply(pages.get(r.args["page"], [])))

    result = automator_runner.run(workflow(f"{api.url}?status=new", "paginate: {page: {}}"))

    assert result.status == "succeeded", result.error
    assert api.asked("page") == ["1", "2", "3", "4"]
    assert api.asked("status") == ["new"] * 4  # the url's own query on every page
    assert delivered_ids(result) == sorted(["1-0", "1-1", "2-0", "3-0", "3-1"])


@covers(FETCH, "paginate.page.param", "paginate.page.start", "paginate.page.size", absent=False)
def test_page_param_start_and_size(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    pages = {"0": tickets(0), "1": tickets(1, count=1)}
    api = Api(httpserver, lambda r: reply({"data": pages.get(r.args["p"], [])}))

    result = automator_runner.run(
        workflow(api.url, "items: data, params: {per_page: 2, p: 7}, paginate: {page: {param: p, start: 0, size: 2}}")
    )

    assert result.status == "succeeded", result.error
    assert api.asked("p") == ["0", "1"]  # page 1 had fewer than size items: the last, no request for page 2
    assert api.asked("per_page") == ["2", "2"]
    assert delivered_ids(result) == sorted(["0-0", "0-1", "1-0"])


@covers(FETCH, "paginate.offset", absent=False)
@covers(FETCH, "paginate.offset.param", "paginate.offset.limit", "paginate.offset.limit_param", absent=True)
def test_offsets_grow_by_the_items_read_until_an_empty_page(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    rows = [{"id": f"r{n}"} for n in range(5)]
    api = Api(httpserver, lambda r: reply(rows[int(r.args["offset"]) :][:2]))  # the server's page size: 2

    result = automator_runner.run(workflow(api.url, "paginate: {offset: {}}"))

    assert result.status == "succeeded", result.error
    assert api.asked("offset") == ["0", "2", "4", "5"]
    assert api.asked("limit") == [None] * 4  # no limit: none sent, and only the empty page ends it
    assert delivered_ids(result) == sorted(["r0", "r1", "r2", "r3", "r4"])


@covers(FETCH, "paginate.offset.param", "paginate.offset.limit", "paginate.offset.limit_param", absent=False)
def test_offset_param_and_limit(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    rows = [{"id": f"r{n}"} for n in range(5)]
    api = Api(httpserver, lambda r: reply(rows[int(r.args["skip"]) :][: int(r.args["take"])]))

    result = automator_runner.run(workflow(api.url, "paginate: {offset: {param: skip, limit: 2, limit_param: take}}"))

    assert result.status == "succeeded", result.error
    assert list(zip(api.asked("skip"), api.asked("take"), strict=True)) == [("0", "2"), ("2", "2"), ("4", "2")]
    assert delivered_ids(result) == sorted(["r0", "r1", "r2", "r3", "r4"])  # the short page was the last


@covers(FETCH, "paginate.cursor", "paginate.cursor.path", absent=False)
@covers(FETCH, "paginate.cursor.param", absent=True)
def test_cursor_is_sent_back_until_the_server_gives_none(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    cursors = {None: "c2", "c2": 3, "3": None}  # text, a number, then null
    api = Api(
        httpserver,
        lambda r: reply({"data": tickets(r.args.get("cursor")), "meta": {"next": cursors[r.args.get("cursor")]}}),
    )

    result = automator_runner.run(workflow(api.url, "items: data, paginate: {cursor: {path: meta.next}}"))

    assert result.status == "succeeded", result.error
    assert api.asked("cursor") == [None, "c2", "3"]
    assert delivered_ids(result) == sorted(["None-0", "None-1", "c2-0", "c2-1", "3-0", "3-1"])


@covers(FETCH, "paginate.cursor.param", absent=False)
def test_cursor_param_and_a_cursor_the_last_page_leaves_out(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    def answer(request: Request) -> Response:
        after = request.args.get("after")
        return reply({"data": tickets(after)} | ({"next": "x"} if after == "0" else {}))

    api = Api(httpserver, answer)

    result = automator_runner.run(
        workflow(f"{api.url}?after=0", "items: data, paginate: {cursor: {path: next, param: after}}")
    )

    assert result.status == "succeeded", result.error
    assert api.asked("after") == ["0", "x"]  # the first page keeps the url's own value


@covers(FETCH, "paginate.cursor.path", absent=True)
def test_a_cursor_needs_its_path(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - id: src\n    uses: http.fetch\n    with:\n      url: http://x\n"
            "      paginate:\n        cursor: {param: after}\n"
        )

    [problem] = caught.value.problems
    assert (problem.line, "missing required key 'path'" in problem.message) == (7, True), problem


# --- the page cap ---------------------------------------------------------------------------


def endless(request: Request) -> Response:
    page = int(request.args.get("page", "1"))
    return reply(tickets(page, count=1), {"Link": f'</tickets?page={page + 1}>; rel="next"'})


@covers(FETCH, "paginate.max_pages", absent=True)
def test_by_default_a_fetch_stops_after_100_pages_with_a_warning(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api(httpserver, endless)

    with caplog.at_level(logging.WARNING):
        result = automator_runner.run(workflow(api.url, "paginate: {link_header: true}"))

    assert result.status == "succeeded", result.error  # the cap ends the fetch, not the run
    assert len(api.requests) == 100
    assert len(delivered_ids(result)) == 100
    assert result.step("src").summary == "100 pages; stopped at paginate.max_pages (100), the server has more"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and "max_pages" in r.getMessage()]
    assert "stopped after 100 pages" in warning.getMessage()


@covers(FETCH, "paginate.max_pages", absent=False)
def test_max_pages(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    api = Api(httpserver, endless)

    values = fetched(automator_runner, api.url, "paginate: {link_header: true, max_pages: 3}")

    assert len(api.requests) == 3
    assert items(values) == ["1-0", "2-0", "3-0"]
    assert states(values)[-1]["next"] is None  # a resumed run does not go past the cap either


def test_a_last_page_at_the_cap_is_no_warning(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api(httpserver, lambda r: reply(tickets(1) if r.args["page"] == "1" else tickets(2, count=1)))

    with caplog.at_level(logging.WARNING):
        result = automator_runner.run(workflow(api.url, "paginate: {page: {size: 2}, max_pages: 2}"))

    assert result.status == "succeeded", result.error
    assert result.step("src").summary == "2 pages"
    assert not [r for r in caplog.records if "max_pages" in r.getMessage()]


# --- the guards -----------------------------------------------------------------------------


@pytest.fixture
def other_server() -> Iterator[HTTPServer]:
    """Another origin: the same host, another port."""
    server = HTTPServer(host="localhost")
    server.start()
    yield server
    server.clear()
    server.stop()


def linking_to(target: str) -> Callable[[Request], Response]:
    return lambda r: reply(tickets(1), {"Link": f'<{target}>; rel="next"'})


@covers(FETCH, "paginate.other_hosts", absent=True)
def test_a_next_link_to_another_host_fails_the_fetch_and_gets_no_token(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, other_server: HTTPServer
) -> None:
    elsewhere = Api(other_server, lambda r: reply(tickets(2)), path="/more")
    api = Api(httpserver, linking_to(elsewhere.url))

    result = automator_runner.run(
        workflow(api.url, 'headers: {Authorization: "Bearer {{ secrets.TOKEN }}"}, paginate: {link_header: true}'),
        secrets={"TOKEN": TOKEN},
    )

    assert result.status == "failed"
    assert f"page 1 links to the next page at another host ({elsewhere.url})" in (result.error or "")
    assert "paginate.other_hosts: true" in (result.error or "")
    assert elsewhere.requests == []


@covers(FETCH, "paginate.other_hosts", absent=False)
def test_other_hosts_follows_it_with_the_headers(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, other_server: HTTPServer
) -> None:
    elsewhere = Api(other_server, lambda r: reply(tickets(2)), path="/more")
    api = Api(httpserver, linking_to(elsewhere.url))

    result = automator_runner.run(
        workflow(
            api.url,
            'headers: {Authorization: "Bearer {{ secrets.TOKEN }}"}, paginate: {link_header: true, other_hosts: true}',
        ),
        secrets={"TOKEN": TOKEN},
    )

    assert result.status == "succeeded", result.error
    assert [r.headers.get("Authorization") for r in elsewhere.requests] == [f"Bearer {TOKEN}"]
    assert delivered_ids(result) == sorted(["1-0", "1-1", "2-0", "2-1"])


def link_loop(request: Request) -> Response:
    # a -> b -> a
    page = request.args.get("p", "a")
    return reply(tickets(page), {"Link": '</tickets?p=b>; rel="next"' if page == "a" else '</tickets>; rel="next"'})


def cursor_loop(request: Request) -> Response:
    # a -> b -> b
    return reply({"data": tickets(request.args.get("cursor", "a")), "next": "b"})


@pytest.mark.parametrize(
    ("settings", "answer", "said"),
    [
        ("paginate: {link_header: true}", link_loop, "gives as the next page's link"),
        ("items: data, paginate: {cursor: {path: next}}", cursor_loop, "gives as the next page's cursor b"),
    ],
    ids=["link", "cursor"],
)
def test_a_next_page_seen_before_ends_the_fetch_with_an_error(
    automator_runner: WorkflowRunner,
    httpserver: HTTPServer,
    settings: str,
    answer: Callable[[Request], Response],
    said: str,
) -> None:
    # the server's bug: without the guard the fetch would go round up to max_pages
    api = Api(httpserver, answer)

    result = automator_runner.run(workflow(api.url, settings))

    assert result.status == "failed"
    assert said in (result.error or "") and "go round in a loop" in (result.error or ""), result.error
    assert len(api.requests) == 2
    # the pages before the loop went into the run (their outcomes are the engine's business)
    values, error = fetched_until_it_fails(automator_runner, api.url, settings)
    assert items(values) == ["a-0", "a-1", "b-0", "b-1"] and "go round in a loop" in error.message


def test_a_page_the_same_as_the_one_before_ends_the_fetch_with_an_error(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    # the server does not know the parameter: it sends its first page again and again
    api = Api(httpserver, lambda r: reply(tickets(1)))

    result = automator_runner.run(workflow(api.url, "paginate: {page: {param: pg}}"))

    assert result.status == "failed"
    assert "page 2 has the same items as page 1: the server seems to ignore the 'pg' parameter" in (result.error or "")
    assert len(api.requests) == 2


def test_an_error_on_page_3_of_5_fails_the_run_and_names_the_page(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    def answer(request: Request) -> Response:
        page = int(request.args["page"])
        if page == 3:
            return Response("the database is down", status=500)
        return reply(tickets(page) if page <= 5 else [])

    api = Api(httpserver, answer)

    result = automator_runner.run(workflow(api.url, "paginate: {page: {}}", top="defaults: {retry: {attempts: 1}}"))

    assert result.status == "failed"
    error = result.error or ""
    assert f"GET {api.url}?page=3 (page 3) answered 500 INTERNAL SERVER ERROR: the database is down" in error, error
    assert api.asked("page") == ["1", "2", "3"]  # pages 4 and 5 never asked for
    # pages 1 and 2 went into the run, each with a checkpoint after it (their outcomes are the engine's business)
    values, failure = fetched_until_it_fails(automator_runner, api.url, "paginate: {page: {}}")
    assert items(values) == ["1-0", "1-1", "2-0", "2-1"]
    assert states(values)[-1] == {"style": "page", "pages": 2, "next": 3}  # a resumed run asks for page 3 again
    assert failure.retryable  # a 500: worth another try


def test_a_next_link_holding_a_secret_is_redacted_in_the_error(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    def answer(request: Request) -> Response:
        if request.args.get("page") == "2":
            return Response("no", status=403)
        # the server repeats the key in its next link, percent-encoded as it likes
        return reply(tickets(1), {"Link": '</tickets?api_key=t0ken%2Ds3cret&page=2>; rel="next"'})

    api = Api(httpserver, answer)

    result = automator_runner.run(
        workflow(api.url, 'params: {api_key: "{{ secrets.TOKEN }}"}, paginate: {link_header: true}'),
        secrets={"TOKEN": TOKEN},
    )

    assert result.status == "failed"
    assert "api_key=***&page=2 (page 2) answered 403" in (result.error or ""), result.error
    assert "s3cret" not in (result.error or "")


@pytest.mark.parametrize(
    ("paginate", "line", "said"),
    [
        (["link_header: true", "cursor: {path: next}"], 8, "paginate.cursor: cannot be combined with link_header"),
        (["page: {}", "offset: {limit: 10}"], 8, "paginate.offset: cannot be combined with page"),
        (["max_pages: 5"], 7, "say where the next page is"),
        (["link_header: false"], 7, "say where the next page is"),
        (
            ["page: {}", "other_hosts: true"],
            8,
            "paginate.other_hosts: is about next links (link_header, next_url), not page",
        ),
        (["page: {size: 0}"], 7, "greater than or equal to 1"),
    ],
)
def test_a_paginate_block_that_does_not_make_sense_is_an_error_at_its_line(
    automator_runner: WorkflowRunner, paginate: list[str], line: int, said: str
) -> None:
    text = "steps:\n  - id: src\n    uses: http.fetch\n    with:\n      url: http://x\n      paginate:\n"
    text += "".join(f"        {setting}\n" for setting in paginate)

    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(text)

    [problem] = caught.value.problems
    assert said in problem.message and problem.line == line, (problem, text)


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            "format: lines, paginate: {cursor: {path: next}}",
            "format: lines has no JSON document to find paginate.cursor in",
        ),
        ("format: text, paginate: {page: {}}", "format: text makes one item of each page"),
    ],
)
def test_a_format_the_style_cannot_read_is_an_error_at_format(
    automator_runner: WorkflowRunner, settings: str, said: str
) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(f"steps:\n  - id: src\n    uses: http.fetch\n    with: {{url: http://x, {settings}}}\n")

    [problem] = caught.value.problems
    assert said in problem.message, problem
    assert problem.line == 4 and problem.column > 20, problem  # at format:, not at the step


# --- streaming ------------------------------------------------------------------------------


def test_a_pages_items_come_out_before_the_next_page_is_asked_for(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    api = Api(httpserver, lambda r: reply(tickets(r.args["page"]) if r.args["page"] in {"1", "2"} else []))
    step = automator_runner.step(workflow(api.url, "paginate: {page: {}}"), "src").step
    assert isinstance(step, FetchStep)

    async def first_item_then_the_rest() -> tuple[Any, int, list[Any]]:
        pages = step.fetch()
        first = await pages.__anext__()
        asked_by_then = len(api.requests)
        return first, asked_by_then, [value async for value in pages]

    first, asked_by_then, rest = asyncio.run(first_item_then_the_rest())

    assert first == {"id": "1-0"} and asked_by_then == 1
    assert items([first, *rest]) == ["1-0", "1-1", "2-0", "2-1"]


class FirstDelivery:
    """A listener: set when the run's first item is delivered."""

    def __init__(self) -> None:
        self.seen = threading.Event()

    @hookimpl
    def item_outcome(self, event: Any) -> None:
        if event.outcome == "delivered":
            self.seen.set()


def test_the_first_pages_items_are_delivered_while_the_server_holds_the_second(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    listener = FirstDelivery()
    held: list[bool] = []

    def answer(request: Request) -> Response:
        page = request.args["page"]
        if page == "2":
            # page 2 waits until page 1's items went all the way through the run
            held.append(listener.seen.wait(timeout=30))
        return reply(tickets(page) if page in {"1", "2"} else [])

    api = Api(httpserver, answer)

    result = automator_runner.run(workflow(api.url, "paginate: {page: {}}"), plugins=[listener])

    assert result.status == "succeeded", result.error
    assert held == [True], "page 2 was asked for, but no item of page 1 was delivered while it was held"
    assert delivered_ids(result) == sorted(["1-0", "1-1", "2-0", "2-1"])
    assert api.asked("page") == ["1", "2", "3"]


# --- checkpoints and resuming ----------------------------------------------------------------


def test_a_checkpoint_after_each_page_says_where_the_next_one_starts(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    api = Api(httpserver, lambda r: reply(tickets(r.args["page"]) if r.args["page"] in {"1", "2"} else []))

    values = fetched(automator_runner, api.url, "paginate: {page: {}}")

    assert [v if isinstance(v, Checkpoint) else v["id"] for v in values] == [
        "1-0",
        "1-1",
        Checkpoint({"style": "page", "pages": 1, "next": 2}),
        "2-0",
        "2-1",
        Checkpoint({"style": "page", "pages": 2, "next": 3}),
        Checkpoint({"style": "page", "pages": 3, "next": None}),  # over: a resumed run asks for nothing
    ]
    assert all(json.loads(json.dumps(state)) == state for state in states(values))  # JSON, for the ledger


def cursor_api(request: Request) -> Response:
    cursor = request.args.get("cursor", "c1")
    following = {"c1": "c2", "c2": "c3", "c3": None}[cursor]
    return reply({"data": tickets(cursor), "next": following})


def link_api(request: Request) -> Response:
    page = int(request.args.get("page", "1"))
    following = f'</tickets?page={page + 1}&key={request.args["key"]}>; rel="next"' if page < 3 else ""
    return reply(tickets(page), {"Link": following} if following else {})


@pytest.mark.parametrize(
    ("settings", "answer", "parameter", "asked"),
    [
        (
            "paginate: {page: {}}",
            lambda r: reply(tickets(r.args["page"]) if r.args["page"] in {"1", "2", "3"} else []),
            "page",
            ["1", "2", "3", "4"],
        ),
        (
            "paginate: {offset: {limit: 2}}",
            lambda r: reply(tickets(r.args["offset"]) if r.args["offset"] != "4" else []),
            "offset",
            ["0", "2", "4"],
        ),
        ("items: data, paginate: {cursor: {path: next}}", cursor_api, "cursor", [None, "c2", "c3"]),
        ('params: {key: "{{ secrets.TOKEN }}"}, paginate: {link_header: true}', link_api, "page", [None, "2", "3"]),
    ],
    ids=["page", "offset", "cursor", "link"],
)
def test_a_resumed_fetch_starts_at_the_page_its_last_checkpoint_names(
    automator_runner: WorkflowRunner,
    httpserver: HTTPServer,
    settings: str,
    answer: Callable[[Request], Response],
    parameter: str,
    asked: list[str | None],
) -> None:
    api = Api(httpserver, answer)
    whole = fetched(automator_runner, api.url, settings, secrets={"TOKEN": TOKEN})
    assert api.asked(parameter) == asked
    after_page_1 = states(whole)[0]
    api.requests.clear()

    resumed = fetched(automator_runner, api.url, settings, resume_from=after_page_1, secrets={"TOKEN": TOKEN})

    assert api.asked(parameter) == asked[1:]  # page 1 is not asked for again
    assert items(resumed) == items(whole)[2:]
    assert states(resumed) == states(whole)[1:]  # and the pages are counted on from where they were
    assert TOKEN not in json.dumps(states(whole))  # a secret is never written into the ledger ...
    assert all(r.args.get("key") in (None, TOKEN) for r in api.requests)  # ... and is sent again on resume


def test_a_next_link_whose_secret_cannot_be_left_out_gets_no_checkpoint(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    # the secret is in the path: the page's checkpoint would write it into the ledger
    def answer(request: Request) -> Response:
        following = f'</{TOKEN}/tickets?page=2>; rel="next"' if request.path == "/tickets" else ""
        return reply(tickets(request.path.count("/")), {"Link": following} if following else {})

    api = Api(httpserver, answer)
    httpserver.expect_request(f"/{TOKEN}/tickets").respond_with_handler(answer)

    values = fetched(
        automator_runner,
        f"{api.url}?k={{{{ secrets.TOKEN }}}}",
        "paginate: {link_header: true}",
        secrets={"TOKEN": TOKEN},
    )

    # no checkpoint after page 1: a resumed run starts again from the first page
    assert states(values) == [{"style": "link_header", "pages": 2, "next": None}]
    assert items(values) == ["1-0", "1-1", "2-0", "2-1"]


def test_a_checkpoint_of_another_style_is_refused_with_a_clear_error(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    api = Api(httpserver, lambda r: reply([]))

    with pytest.raises(StepError, match="cannot go on from the run's checkpoint") as caught:
        fetched(
            automator_runner,
            api.url,
            "paginate: {cursor: {path: next}}",
            resume_from={"style": "page", "pages": 1, "next": 2},
        )

    assert "was the workflow's paginate: changed?" in str(caught.value)
    assert api.requests == []


PLUGIN = """
import os, signal
from pathlib import Path
from automator import StepConfig, TransformStep, hookimpl

class CrashConfig(StepConfig):
    marker: str
    at_seq: int

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_once"

    def transform(self, item):
        marker = Path(self.config.marker)
        if item.seq == self.config.at_seq and not marker.exists():
            marker.write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: a real crash
        return item.data

@hookimpl
def register_step_types(register):
    register(Crash)
"""


def test_a_run_killed_mid_fetch_goes_on_from_its_last_page_and_takes_no_page_twice(
    tmp_path: Path, history_url: str, httpserver: HTTPServer
) -> None:
    api = Api(httpserver, lambda r: reply(tickets(r.args["page"], count=10) if int(r.args["page"]) <= 6 else []))
    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "workflows").mkdir()
    (project / "plugins" / "crash.py").write_text(textwrap.dedent(PLUGIN))
    out = tmp_path / "out.jsonl"
    flow = project / "workflows" / "paged.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: paged
            chunk_size: 10
            chunks_in_flight: 2
            steps:
              - id: tickets
                uses: http.fetch
                with: {{url: "{api.url}", paginate: {{page: {{}}}}}}
                key: "{{{{ item.id }}}}"
              - id: crash
                uses: test.crash_once
                with: {{marker: "{tmp_path / "crashed"}", at_seq: 35}}
              - id: out
                uses: file.deliver
                with: {{path: "{out}"}}
            """
        )
    )

    run_until_killed(flow, history_url)
    before_the_kill = len(api.requests)
    history = History(history_url)
    try:
        run_id, result = resume_crashed(flow, project / "plugins", history)

        assert result.status == "succeeded", result.error
        keys = [item.key for item in history.items(run_id)]
    finally:
        history.close()
    assert sorted(keys) == sorted(f"{p}-{n}" for p in range(1, 7) for n in range(10))  # each once
    resumed = [int(page) for page in api.asked("page")[before_the_kill:] if page is not None]
    assert resumed and min(resumed) >= 3, api.asked("page")  # pages 1 and 2 were in the ledger: never again
