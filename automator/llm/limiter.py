"""A client-side limiter for requests and tokens per minute, learned from x-ratelimit-* headers.

Each limit is a token bucket, as OpenAI's own limits are: it starts full, holding one
minute's allowance, and refills continuously at limit/60 per second. A job that fits in
one minute's quota goes out at once; a larger one uses that minute's allowance and then
runs at the account's rate. A request larger than the bucket waits until the bucket is
full and then borrows (the level goes negative), so nothing stalls.

Limits come from the step's config and from the server's headers (the lower wins); the
``remaining`` headers pull the local level down when the server knows better (another
process sharing the key, say); a 429 pauses everyone for its ``retry-after``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RESET_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations (``6m0s``, ``1.5s``, ``120ms``) in seconds."""
    if not value:
        return None
    parts = _RESET_PART.findall(value.strip())
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    return sum(float(n) * _RESET_UNITS[u] for n, u in parts)


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


@dataclass
class Bucket:
    """One per-minute limit as a token bucket; ``limit`` None means unlimited."""

    configured: int | None
    burst: float
    clock: Callable[[], float]
    learned: int | None = None
    level: float = 0.0
    stamp: float = field(default=0.0)

    def __post_init__(self) -> None:
        # start full, as the API's own bucket does: what one minute allows needs no waiting
        self.stamp = self.clock()
        self.level = self.capacity if self.limit is not None else 0.0

    @property
    def limit(self) -> int | None:
        known = [x for x in (self.configured, self.learned) if x]
        return min(known) if known else None

    @property
    def rate(self) -> float:
        return (self.limit or 0) / 60.0

    @property
    def capacity(self) -> float:
        return max(self.rate * self.burst, 1.0)

    def refill(self) -> None:
        now = self.clock()
        if self.limit is not None:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 if now)."""
        if self.limit is None:
            return 0.0
        self.refill()
        needed = min(amount, self.capacity)
        if self.level >= needed:
            return 0.0
        return (needed - self.level) / self.rate

    def take(self, amount: float) -> None:
        if self.limit is not None:
            self.level -= amount

    def learn(self, limit: int | None, remaining: int | None, unsent: float = 0.0, sent_after: float = 0.0) -> None:
        """Take the server's word: its limit, and what remained of it when it counted a request.

        The API counts a request when it arrives. An answer's ``remaining`` cannot include
        our requests not sent yet (``unsent``); those sent after the answered one
        (``sent_after``) it may or may not include, depending on when they arrived. Our own
        count already holds every request we sent, so it is lowered only when the server
        says less remains than even the kindest reading (someone else uses the same key);
        the first limit heard of starts the count from the server's word, every request
        not known to be in it taken off.
        """
        if limit is not None and limit > 0 and limit != self.learned:
            first = self.learned is None and self.configured is None
            self.learned = limit
            if first:
                # the first limit heard of: the server's remaining count (below) says how full it is
                self.level = self.capacity
                self.stamp = self.clock()
                if remaining is not None:
                    self.level = min(self.level, float(remaining) - unsent - sent_after)
                return
        if remaining is not None and self.limit is not None:
            self.refill()
            self.level = min(self.level, float(remaining) - unsent)


class RateLimiter:
    """Requests- and tokens-per-minute pacing shared by all of a step's concurrent calls."""

    def __init__(
        self,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        burst_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.requests = Bucket(rpm, burst_seconds, clock)
        self.tokens = Bucket(tpm, burst_seconds, clock)
        self._lock = asyncio.Lock()
        self._paused_until = 0.0
        self.waited_s = 0.0
        self.rate_limited = 0  # 429s seen
        # taken and not yet answered: the server's remaining counts may not include them yet.
        # ticket -> [tokens, the order it was sent in (None: not sent yet)]; a request is sent
        # a moment after its ticket (its call is written down first), so tickets and
        # arrivals at the server need not be in the same order
        self._in_flight: dict[int, list[int | None]] = {}
        self._tickets = 0
        self._sent = 0

    async def acquire(self, tokens: int) -> int:
        """Wait until one request of ``tokens`` fits in both limits.

        ``tokens`` is what the API counts against tokens per minute: the prompt's messages
        plus max_tokens (the output schema is billed but not counted). ``waited_s`` adds up
        the time spent waiting here. Returns the request's ticket for ``done``.
        """
        async with self._lock:  # first come, first served
            while True:
                delay = max(
                    self._paused_until - self.clock(),
                    self.requests.wait_for(1),
                    self.tokens.wait_for(tokens),
                )
                if delay <= 0:
                    break
                self.waited_s += delay
                await asyncio.sleep(delay)
            self.requests.take(1)
            self.tokens.take(tokens)
            self._tickets += 1
            self._in_flight[self._tickets] = [tokens, None]
            return self._tickets

    def sending(self, ticket: int) -> None:
        """The request of ``ticket`` leaves now (the server counts it when it arrives)."""
        entry = self._in_flight.get(ticket)
        if entry is not None:
            self._sent += 1
            entry[1] = self._sent

    def done(self, ticket: int, headers: Mapping[str, str]) -> None:
        """The request of ``ticket`` was answered (or failed): learn from its headers.

        Every ``acquire`` is paired with one ``done``, whatever became of the request, so
        the requests the answer cannot count yet are known: those sent after this one,
        and those taken but not sent yet.
        """
        entry = self._in_flight.pop(ticket, None)
        mine = entry[1] if entry is not None else None
        unsent = [int(tokens or 0) for tokens, order in self._in_flight.values() if order is None]
        after = [
            int(tokens or 0)
            for tokens, order in self._in_flight.values()
            if order is not None and (mine is None or order > mine)
        ]
        self.requests.learn(
            _int_header(headers, "x-ratelimit-limit-requests"),
            _int_header(headers, "x-ratelimit-remaining-requests"),
            len(unsent),
            len(after),
        )
        self.tokens.learn(
            _int_header(headers, "x-ratelimit-limit-tokens"),
            _int_header(headers, "x-ratelimit-remaining-tokens"),
            sum(unsent),
            sum(after),
        )

    def pause(self, seconds: float) -> None:
        """After a 429: nobody sends until the server's retry-after has passed."""
        self.rate_limited += 1
        self._paused_until = max(self._paused_until, self.clock() + seconds)
        for bucket in (self.requests, self.tokens):
            bucket.refill()
            bucket.level = min(bucket.level, 0.0)

    @property
    def ceiling_per_second(self) -> tuple[float | None, float | None]:
        """Requests/s and tokens/s the known limits allow."""
        return (
            self.requests.rate if self.requests.limit else None,
            self.tokens.rate if self.tokens.limit else None,
        )
