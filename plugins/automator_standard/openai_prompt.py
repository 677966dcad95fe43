"""Building a chat request for one item: static instructions first, the item last.

Prompt caching matches exact prefixes, so everything that is the same for every item
(instructions, few-shot examples) comes first and the item's text and images last.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagesize

from automator.errors import QuarantineItem

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # OpenAI refuses larger images


@dataclass
class Image:
    url: str  # an http(s) URL or a data URL
    detail: str
    size: tuple[int, int] | None  # pixels, when known before sending


@dataclass
class Prompt:
    """The messages of one item's request, and what counting their tokens needs."""

    messages: list[dict[str, Any]]
    images: list[Image] = field(default_factory=list)

    @property
    def image_sizes(self) -> dict[str, tuple[int, int] | None]:
        return {image.url: image.size for image in self.images}


def _size_of(data: bytes) -> tuple[int, int] | None:
    try:
        width, height = imagesize.get(io.BytesIO(data))
    except (ValueError, OSError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def image_from_file(path: Path, detail: str) -> Image:
    """A local image as a data URL; a missing or unreadable file quarantines the item."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QuarantineItem(f"image {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise QuarantineItem(f"image {path}: {len(data):,} bytes, more than the 20 MB the API accepts")
    size = _size_of(data)
    if size is None:
        raise QuarantineItem(f"image {path}: not a PNG, JPEG, GIF or WebP image")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return Image(f"data:{mime};base64,{base64.b64encode(data).decode()}", detail, size)


def image_from_url(url: str, detail: str) -> Image:
    size = None
    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        try:
            size = _size_of(base64.b64decode(payload, validate=False))
        except ValueError:
            size = None
    return Image(url, detail, size)


def build_messages(
    instructions: str, examples: list[tuple[str, str]], user_text: str, images: list[Image]
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
    for shown, answer in examples:
        messages.append({"role": "user", "content": shown})
        messages.append({"role": "assistant", "content": answer})
    if images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": user_text}]
        parts.extend({"type": "image_url", "image_url": {"url": i.url, "detail": i.detail}} for i in images)
        messages.append({"role": "user", "content": parts})
    else:
        messages.append({"role": "user", "content": user_text})
    return messages


def request_key(params: dict[str, Any]) -> str:
    """The response cache's key: a hash of everything that shapes the answer."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def repair_turns(answer: str, problem: str, *, structured: bool) -> list[dict[str, Any]]:
    """The model's rejected answer and what was wrong with it, to ask again."""
    ask = (
        "Reply again with only a JSON object that matches the schema."
        if structured
        else "Reply again, following the instructions."
    )
    return [
        {"role": "assistant", "content": answer or "(no answer)"},
        {"role": "user", "content": f"Your previous answer was not accepted: {problem}. {ask}"},
    ]
