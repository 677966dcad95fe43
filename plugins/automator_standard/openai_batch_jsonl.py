"""The Batch API's files: one JSONL line per request, split under the API's limits, and its answers read back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from automator import Item
from automator.llm.calls import Answer
from automator_standard.openai_prompt import Prompt

ENDPOINT = "/v1/chat/completions"


@dataclass
class Request:
    """One item's request, waiting for its answer."""

    index: int
    item: Item
    prompt: Prompt
    prompt_tokens: int
    key: str
    custom_id: str
    params: dict[str, Any]
    reserved: Decimal = Decimal(0)
    answer: Answer | None = None  # once accepted: identical items of the run take it


@dataclass
class Job:
    """One submitted batch and the requests it carries."""

    row_id: int
    batch_id: str
    status: str
    requests: list[Request]
    created: float = field(default_factory=time.monotonic)
    data: Any = None


def custom_id(run_id: int, seq: int) -> str:
    return f"run-{run_id}-item-{seq}"


def jsonl_line(request: Request) -> bytes:
    line = {"custom_id": request.custom_id, "method": "POST", "url": ENDPOINT, "body": request.params}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def split(requests: list[Request], max_requests: int, max_bytes: int) -> list[tuple[list[Request], bytes]]:
    """Input files under both limits (a request larger than the byte limit goes alone; the API judges it)."""
    chunks: list[tuple[list[Request], bytes]] = []
    members: list[Request] = []
    lines: list[bytes] = []
    size = 0
    for request in requests:
        line = jsonl_line(request)
        if members and (len(members) >= max_requests or size + len(line) > max_bytes):
            chunks.append((members, b"".join(lines)))
            members, lines, size = [], [], 0
        members.append(request)
        lines.append(line)
        size += len(line)
    if members:
        chunks.append((members, b"".join(lines)))
    return chunks


def error_message(line: dict[str, Any]) -> str:
    error = line.get("error")
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('code') or 'error'}: {error['message']}"
    body = (line.get("response") or {}).get("body")
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
    return "no detail given"


def why_missing(batch: Any) -> str:
    """Why a batch has no answer for a request: its status and the errors it lists."""
    reasons = []
    errors = getattr(batch, "errors", None)
    for error in getattr(errors, "data", None) or []:
        reasons.append(f"{error.code or 'error'}: {error.message or ''}".strip())
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return f"the batch ended {batch.status}{detail}"


def chat_completion() -> Any:
    from openai.types.chat import ChatCompletion  # imported when first needed: CLI start-up time

    return ChatCompletion
