"""LLM prompts under a token budget: OpenAI-compatible chat completions.

Items are prompt records (``pipeline.items.JsonlPrompts``): a JSON object with
a ``prompt`` field (or ``messages``, a ready chat message list). Each call
posts one chat completion over the chunk's client and stores the answer,
finish reason and the ``usage`` the server reports.

Pacing is the engine's, from the declared tokens/min and requests/min
together: before each call it charges the worker's token budget with
``cost(item)``, an estimate that is an upper bound (prompt tokens plus
``max_tokens``); after it, ``usage(payload)`` returns the response's
``usage.total_tokens`` and the engine pays back the difference, so a rough
estimate costs nothing over a run. 429 and 503 wait the server's
``retry-after-ms`` / ``Retry-After``.

Prompt tokens are counted with ``tiktoken`` when it is installed *and* its
encoding loads (it downloads encodings on first use, which fails offline).
Otherwise the documented fallback is ``ceil(len(content) / 4) + 4`` per
message — the rule the bundled local LLM server charges, and close to
OpenAI's tokenizers on English text. Either way the reconciliation above
corrects the budget after each call.

Not done: streaming, tools/function calls, and any retry of a bad answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.outcomes import Permanent, raise_for_refusal
from pipeline.spec import Service
from pipeline.tokens import approximate_tokens
from pipeline.tokens import prompt_tokens as count_prompt_tokens
from pipeline.work import Item
from pipeline.workloads.common import check, check_http_url, item_record, require_limit
from pipeline.workloads.http_api import HttpClientConfig

CHAT_PATH = "/chat/completions"


@dataclass(frozen=True, kw_only=True)
class LlmWork(HttpClientConfig):
    """One chat completion per prompt record. ``token`` is the API key (sent as a bearer token).

    ``base_url`` is the API root including its version, as OpenAI clients
    take it: ``https://api.openai.com/v1``, or ``<local server>/v1``.
    """

    base_url: str
    model: str
    prompt_field: str = "prompt"
    system_prompt: str = ""
    max_tokens: int = 256
    temperature: float | None = None
    encoding: str = "cl100k_base"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        owner = "LlmWork"
        self._check_client()
        check_http_url(owner, "base_url", self.base_url)
        check(bool(self.model.strip()), owner, "model", "is empty", "Name the model, e.g. model='gpt-4o-mini'.")
        check(
            bool(self.prompt_field),
            owner,
            "prompt_field",
            "is empty",
            "Name the field of each JSONL record that holds the prompt, e.g. 'prompt'.",
        )
        check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            owner,
            "max_tokens",
            f"must be a whole number >= 1, got {self.max_tokens!r}",
            "It caps each answer and sizes the token estimate.",
        )
        check(
            self.temperature is None or 0 <= self.temperature <= 2,
            owner,
            "temperature",
            f"must be between 0 and 2, got {self.temperature!r}",
            "Leave it unset for the model's default.",
        )

    def call(self, client: Any, item: Item) -> Any:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(item), "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        response = client.post(self.base_url.rstrip("/") + CHAT_PATH, json=body)
        raise_for_refusal(response, self.conventions)  # a 429 waits; insufficient_quota stops the run
        return _answer(response.json())

    def messages(self, item: Item) -> list[dict[str, Any]]:
        """The chat messages for a prompt record: its ``messages``, or the system prompt and its prompt."""
        record = item_record(item)
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            return record["messages"]
        if not isinstance(record, dict) or not isinstance(record.get(self.prompt_field), str):
            raise Permanent(
                f"prompt {item.id} has no text field {self.prompt_field!r} (nor a 'messages' list); "
                "fix the record or set prompt_field",
                status="bad_item",
            )
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": record[self.prompt_field]}]

    def cost(self, item: Item) -> float:
        """Upper-bound token estimate before the call: prompt tokens plus ``max_tokens``."""
        try:
            messages = self.messages(item)
        except Permanent:
            return 0.0  # the call will fail at once, without spending tokens
        return float(prompt_tokens(messages, self.encoding) + self.max_tokens)

    def usage(self, payload: Any) -> float | None:
        """What the call really cost, as the server reports it (``usage.total_tokens``)."""
        usage = payload.get("usage") if isinstance(payload, dict) else None
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        return float(total) if isinstance(total, (int, float)) else None


def llm_work(model: str, **options: Any) -> Callable[[Service], LlmWork]:
    """``BackfillSpec.work`` for an LLM: the service URL is the API root, its secret the API key.

    Refuses a service that does not declare ``tokens_per_minute``: the token
    budget is what this workload is paced by.
    """

    def build(service: Service) -> LlmWork:
        require_limit(service, "tokens_per_minute", "LlmWork", "60_000")
        return LlmWork(base_url=service.url, model=model, token=service.secret, **options)

    return build


def prompt_tokens(messages: list[dict[str, Any]], encoding: str = "cl100k_base") -> int:
    """Tokens of the messages' text: tiktoken if usable offline, else ceil(chars / 4), plus 4 per message."""
    return count_prompt_tokens(messages, _tokenizer(encoding) or approximate_tokens)


@functools.cache
def _tokenizer(encoding: str) -> Callable[[str], int] | None:
    """tiktoken's counter for ``encoding``, or None when tiktoken or the encoding is unavailable."""
    try:
        import tiktoken

        encoder = tiktoken.get_encoding(encoding)
    except Exception:  # noqa: BLE001 - not installed, unknown encoding, or no network to download it
        return None
    return lambda text: len(encoder.encode(text, disallowed_special=()))


def _answer(response: Any) -> dict[str, Any]:
    """The first choice's text, its finish reason, the model and the usage: a small payload."""
    try:
        choice = response["choices"][0]
        return {
            "content": choice["message"]["content"],
            "finish_reason": choice.get("finish_reason"),
            "model": response.get("model"),
            "usage": response.get("usage"),
        }
    except (KeyError, IndexError, TypeError) as error:
        raise Permanent(f"not a chat completion response (missing {error})", status="bad_payload") from None
