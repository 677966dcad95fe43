"""``automator trigger NAME``: a request row the running daemon claims and turns into a run.

The database is the channel because every daemon and every CLI already share it: no
address to configure, no port to open, and it works from another machine too.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from automator.daemon.runs import Fire
from automator.engine.runner import resolve_params
from automator.errors import AutomatorError
from automator.history.daemon_models import TriggerRequest
from automator.history.protocols import SchedulerStore
from automator.history.states import RequestStatus
from automator.spec.loader import Workflow

log = logging.getLogger("automator.daemon")

# a request for a workflow this daemon does not have is left this long for another daemon
UNKNOWN_AFTER = timedelta(seconds=5)


def take_requests(store: SchedulerStore, me: str, workflows: dict[str, Workflow]) -> list[Fire]:
    """Claim the pending requests this daemon can serve; reject the ones nobody can."""
    fires: list[Fire] = []
    for request in store.pending_requests():
        workflow = workflows.get(request.workflow)
        if workflow is None:
            if datetime.now(UTC) - request.requested_at > UNKNOWN_AFTER and store.claim_request(request.id, me):
                known = ", ".join(sorted(workflows)) or "none"
                store.settle_request(
                    request.id,
                    status=RequestStatus.REJECTED,
                    error=f"no workflow named {request.workflow!r} (loaded: {known})",
                )
            continue
        if not store.claim_request(request.id, me):
            continue  # another daemon took it
        try:
            params = resolve_params(workflow, request.params)
        except AutomatorError as exc:
            store.settle_request(request.id, status=RequestStatus.REJECTED, error=exc.message)
            continue
        log.info(
            "manual trigger of %s (request %s)",
            workflow.name,
            request.id,
            extra={"workflow": workflow.name, "request_id": request.id},
        )
        fires.append(Fire(workflow=workflow.name, trigger="manual", params=params, request_id=request.id))
    return fires


def request_run(store: SchedulerStore, workflow: str, params: dict[str, object], timeout: float) -> TriggerRequest:
    """Ask the running daemon for a run; wait until it starts it (or says no) or time runs out."""
    request_id = store.request_trigger(workflow, dict(params))
    deadline = time.monotonic() + timeout
    request = store.get_request(request_id)
    while request is not None and time.monotonic() < deadline:
        if request.status in (RequestStatus.STARTED, RequestStatus.REJECTED):
            return request
        time.sleep(0.2)
        request = store.get_request(request_id)
    if store.cancel_request(request_id):
        request = store.get_request(request_id)
    assert request is not None
    return request
