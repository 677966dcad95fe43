"""The limiter learns from an answer's remaining counts only what that answer could count."""

from __future__ import annotations

import asyncio

from automator.llm.limiter import RateLimiter


def test_a_request_taken_but_not_yet_sent_is_not_in_an_answers_remaining() -> None:
    # the ticket is taken before the call is written down; the request leaves after that,
    # so a later ticket may reach the server first
    now = [0.0]
    limiter = RateLimiter(tpm=1000, clock=lambda: now[0])

    async def scenario() -> float:
        first = await limiter.acquire(300)
        second = await limiter.acquire(300)
        limiter.sending(second)
        # the server counted only the second request when it answered it: 700 left of 1000
        limiter.done(second, {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "700"})
        level = limiter.tokens.level
        limiter.sending(first)
        limiter.done(first, {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "400"})
        return level

    # after the second's answer: 700 remaining, less the first's 300 still to arrive
    assert asyncio.run(scenario()) == 400
    assert limiter.tokens.level == 400
