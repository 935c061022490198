"""An OpenAI-compatible chat-completions server with token and request budgets.

    python -m pipeline.localservices.llm --port 0 --tpm 6000 --rpm 120 \\
        [--window-s 60] [--key SECRET] [--completion-tokens 16] [--latency-ms 20] \\
        [--state-file PATH]

It prints ``READY http://127.0.0.1:<port>`` once listening. It lets the
token-budget logic of a client be judged by the server, not by the client's
own bookkeeping: every request is logged with the tokens it was charged.

Token counting (the server's rule; clients estimate with the same rule or a
real tokenizer, and should keep a margin)
    prompt_tokens     = sum over messages of ceil(len(content) / 4) + 4
                        (content as a string; for a list of parts, the
                        concatenated ``text`` parts; missing content is "")
    completion_tokens = min(max_tokens or C, C) with C = ``--completion-tokens``
                        (``max_completion_tokens`` is accepted as ``max_tokens``)
    total_tokens      = prompt_tokens + completion_tokens

Limits, over a sliding window of ``--window-s`` seconds (default 60, so the
flags read as per-minute budgets; tests shrink the window and the budgets
together)
    ``--tpm``  total_tokens admitted per window (default unlimited)
    ``--rpm``  requests admitted per window (default unlimited)
Both budgets are checked together before a request is admitted. Over either:
``429`` with ``Retry-After`` = whole seconds until enough budget frees (>= 1)
and ``{"error": {"message", "type": "rate_limit_exceeded", ...}}``. A request
larger than the whole token budget can never fit, so it gets ``400``
(``code: "request_too_large"``) instead of a 429 a client would retry forever.
Responses to admitted and throttled requests carry, as OpenAI does, for each
budget that is set: ``x-ratelimit-limit-{tokens,requests}`` (the budget per
window), ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (a Go
duration such as ``850ms``: until the oldest admission leaves the window and
budget comes back).

A per-minute budget that a provider enforces over a shorter window ("60,000
tokens/min, enforced as 1,000/s") is ``--tpm 1000 --window-s 1``: the budgets
are per window, whatever its length.

``--key SECRET`` requires ``Authorization: Bearer SECRET`` (else 401).

Faults, chosen by the prefix of the last message's text (deterministic), so
a prompt file can exercise a client's error handling: the prefixes of
``http_api`` items (``e500-``, ``e503-``, ``e404-``, ``e400-``, ``throttle-``,
``throttlenoretry-``, ``slow-``, ``badjson-``, ``reset-``, ``heal{N}-``), with
the same meaning (see ``_common.Faults``) and OpenAI-shaped error bodies. A
fault is decided after auth and body checks and before the budgets, so a
fault reply charges no tokens; the normal answer that ``slow-``, ``reset-``
and a healed ``heal{N}-`` give is admitted and charged as usual. ``heal{N}``
counts hits per exact prompt text; ``--state-file`` keeps the counts across
restarts, and ``/_reset`` clears them.

Admin: ``GET /_stats``, ``GET /_arrivals``, ``POST /_reset``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from pipeline.localservices._common import (
    Admission,
    Faults,
    Reply,
    Request,
    Service,
    SlidingWindowLimiter,
    busiest_window,
    count_by_status,
    json_reply,
    openai_ratelimit_headers,
    serve,
    service_parser,
)
from pipeline.tokens import content_text, prompt_tokens

CHAT_PATH = "/v1/chat/completions"


def _error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """An OpenAI-shaped error body, so real OpenAI clients parse it as they would in production."""
    return json_reply(status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers)


def _fault_error(status: int, message: str, headers: dict[str, str] | None) -> Reply:
    """A fault's reply in the error type OpenAI uses for that status."""
    if status == 429:
        return _error(status, message, "rate_limit_exceeded", "rate_limit_exceeded", headers)
    return _error(status, message, "server_error" if status >= 500 else "invalid_request_error", None, headers)


def _last_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last message: what the reply echoes and what picks a fault."""
    return content_text(messages[-1].get("content")) if messages else ""


def _answer(messages: list[dict[str, Any]]) -> str:
    """A deterministic short reply derived from the last message."""
    return f"[local-llm] {_last_text(messages)[:60]}"


def _parse_chat(request: Request) -> tuple[dict[str, Any] | None, str]:
    """The request body if it is a usable chat request, else ``None`` and why."""
    try:
        body = request.json()
    except ValueError:
        return None, "body is not valid JSON"
    if not isinstance(body, dict):
        return None, "body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, "'messages' must be a list of objects"
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return None, "'max_tokens' must be a positive integer"
    return body, ""


class LocalLlm(Service):
    """State shared by handler threads: the token/request limiter and settings."""

    def __init__(
        self,
        tpm: float | None,
        rpm: float | None,
        window_s: float,
        key: str | None,
        completion_tokens: int,
        latency_ms: float,
        state_file: str | None = None,
    ) -> None:
        super().__init__()
        self.limiter = SlidingWindowLimiter(window_s, {"tokens": tpm, "requests": rpm})
        self.tpm, self.rpm, self.window_s = tpm, rpm, window_s
        self.key = key
        self.completion_tokens = completion_tokens
        self.latency_s = latency_ms / 1000
        self.faults = Faults(_fault_error, state_file)

    def handle(self, request: Request) -> Reply:
        if not request.bearer_ok(self.key):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if (request.method, request.path) != ("POST", CHAT_PATH):
            return _error(404, f"Unknown endpoint {request.method} {request.path}", "invalid_request_error")
        body, problem = _parse_chat(request)
        if body is None:
            return _error(400, problem, "invalid_request_error")
        fault = self.faults.reply(_last_text(body["messages"]), lambda: self._complete(body))
        return fault if fault is not None else self._complete(body)

    def _complete(self, body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        requested = body.get("max_tokens", body.get("max_completion_tokens")) or self.completion_tokens
        usage = {"prompt_tokens": prompt_tokens(messages), "completion_tokens": min(requested, self.completion_tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        admission = self.limiter.try_admit({"tokens": usage["total_tokens"], "requests": 1})
        if admission.wait > 0:
            return self._rejected(admission, usage["total_tokens"])
        time.sleep(self.latency_s)
        model = body.get("model") or "local-llm"
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(admission.t),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _answer(messages)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        headers = openai_ratelimit_headers(admission, self.limiter.limits)
        return json_reply(200, payload, headers, t=admission.t, tokens=usage["total_tokens"])

    def _rejected(self, admission: Admission, total_tokens: int) -> Reply:
        if math.isinf(admission.wait):
            reply = _error(
                400,
                f"Request needs {total_tokens} tokens, more than the whole budget "
                f"(tpm={self.tpm}, rpm={self.rpm} per {self.window_s:g} s); it can never be admitted.",
                "invalid_request_error",
                "request_too_large",
            )
        else:
            headers = {
                "Retry-After": str(max(1, math.ceil(admission.wait))),
                **openai_ratelimit_headers(admission, self.limiter.limits),
            }
            reply = _error(
                429,
                f"Rate limit reached (tpm={self.tpm}, rpm={self.rpm} per {self.window_s:g} s). "
                f"Please try again in {admission.wait:.3f}s.",
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                headers,
            )
        reply.t = admission.t
        return reply

    def stats(self) -> dict[str, Any]:
        arrivals = self.log.snapshot()
        accepted = [a for a in arrivals if a["status"] == 200]
        return {
            "count": len(arrivals),
            "by_status": count_by_status(arrivals),
            "accepted_requests": len(accepted),
            "accepted_tokens": sum(a["tokens"] for a in accepted),
            "busiest_window_tokens": busiest_window(
                (a["t"] for a in accepted), self.window_s, [a["tokens"] for a in accepted]
            ),
            "busiest_window_requests": busiest_window((a["t"] for a in accepted), self.window_s),
            "window_s": self.window_s,
            "tpm": self.tpm,
            "rpm": self.rpm,
            "first_t": min((a["t"] for a in arrivals), default=None),
            "last_t": max((a["t"] for a in arrivals), default=None),
        }

    def reset(self) -> None:
        """Clear arrivals, both budgets and the fault heal counters."""
        super().reset()
        self.limiter.clear()
        self.faults.clear()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve forever."""
    parser = service_parser("OpenAI-compatible chat completions with token and request budgets.")
    parser.add_argument("--tpm", type=float, default=None, help="tokens per window (default unlimited)")
    parser.add_argument("--rpm", type=float, default=None, help="requests per window (default unlimited)")
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    service = LocalLlm(
        args.tpm, args.rpm, args.window_s, args.key, args.completion_tokens, args.latency_ms, args.state_file
    )
    serve(service, args.port, args.watch_stdin)


if __name__ == "__main__":
    main()
