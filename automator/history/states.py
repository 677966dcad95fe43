"""The states a run, a step attempt, an item, a model call and a trigger request can be in.

They are ``StrEnum``s: each member *is* its string, so the history stores, and ``--json``
prints, exactly the words it always did (``"succeeded"``, ``"delivered"``, ...) and no
migration is needed. Code compares and assigns members, never bare strings.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is: ``running`` until the engine (or crash recovery) ends it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"
    SKIPPED = "skipped"  # a fire the daemon did not run (overlap, full queue)

    @property
    def finished(self) -> bool:
        """True for every status but ``running``."""
        return self is not RunStatus.RUNNING


class StepStatus(StrEnum):
    """How one attempt of a step ended (``running`` while it runs)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"


class Outcome(StrEnum):
    """An item's place in the ledger: ``pending`` until it ends in exactly one final outcome."""

    PENDING = "pending"
    DELIVERED = "delivered"
    SKIPPED = "skipped"
    QUARANTINED = "quarantined"
    FAILED = "failed"


# the final outcomes, in the order the CLI shows them; a run's counts are these plus "fetched"
FINAL_OUTCOMES: tuple[Outcome, ...] = (Outcome.DELIVERED, Outcome.SKIPPED, Outcome.QUARANTINED, Outcome.FAILED)


class CallStatus(StrEnum):
    """Where a model call is: ``sent`` from just before its request leaves until its answer is recorded."""

    SENT = "sent"  # the request left (or is about to): its cost is at most cost_bound_usd
    UNCONFIRMED = "unconfirmed"  # sent, and the answer was lost in a crash: costed at its upper bound
    OK = "ok"
    ERROR = "error"
    REJECTED = "rejected"  # answered, but the answer failed validation (or was a refusal)
    CACHED = "cached"  # answered from the response cache: nothing paid


class RequestStatus(StrEnum):
    """A manual trigger request (``automator trigger``) on its way to a daemon."""

    PENDING = "pending"
    CLAIMED = "claimed"
    STARTED = "started"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


class ChunkStatus(StrEnum):
    """A chunk of a run's items: open until every item in it has its outcome."""

    OPEN = "open"
    DONE = "done"
