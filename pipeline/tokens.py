"""The offline token estimate: ``ceil(chars / 4) + 4`` per chat message.

One rule, shared by the LLM workload (its fallback when no tokenizer loads
offline) and the bundled OpenAI-compatible server (what it charges), so that
the estimate a client pays up front is the one the local service bills.
Real providers count differently; the workload reconciles with the ``usage``
each response reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def approximate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def content_text(content: Any) -> str:
    """A message's text: the string, or the ``text`` parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def prompt_tokens(messages: list[dict[str, Any]], count: Callable[[str], int] = approximate_tokens) -> int:
    """Tokens of a list of chat messages, text counted by ``count``, plus the per-message overhead."""
    return sum(count(content_text(m.get("content"))) + TOKENS_PER_MESSAGE for m in messages)
