"""An OpenAI-compatible chat-completions server with token and request budgets.

    python -m pipeline.localservices.llm --port 0 --tpm 6000 --rpm 120 \\
        [--window-s 60] [--key SECRET] [--completion-tokens 16] [--latency-ms 20] \\
        [--credit-tokens N] [--state-file PATH]

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

Out of credit (``--credit-tokens N``, OpenAI's prepaid balance running dry;
https://platform.openai.com/docs/guides/error-codes/api-errors): every
admitted request's total_tokens is also charged against a balance of N. Once
the balance cannot cover a request, that request and every later one, however
small, get ``429`` without ``Retry-After`` (waiting does not help) and
``{"error": {"message": "You exceeded your current quota, please check your
plan and billing details. For more information on this error, read the docs:
https://platform.openai.com/docs/guides/error-codes/api-errors.", "type":
"insufficient_quota", "param": null, "code": "insufficient_quota"}}``, until
``POST /_topup`` with ``{"tokens": N}`` adds N to the balance (answering
``{"credit_left": ...}``; a body without a positive integer is a 400). The
balance is checked after the faults and before the rate budgets, so a request
refused for credit charges neither; ``/_reset`` restores the starting balance.

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

``/_stats``: ``count``, ``by_status``, ``accepted_requests`` / ``accepted_tokens`` (200s),
``busiest_window_tokens`` / ``busiest_window_requests`` (accepted, in the busiest sliding
window) against ``tpm`` / ``rpm`` per ``window_s``, ``refused`` (429s of the rate
budgets and of the credit; each arrival in ``/_arrivals`` says ``refused``), ``credit_left`` (``None`` without ``--credit-tokens``), ``refused_for_credit``,
``first_t`` / ``last_t``.

Admin: ``GET /_stats``, ``GET /_arrivals``, ``POST /_reset``, ``POST /_topup``.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any, Callable

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
OUT_OF_CREDIT = (
    "You exceeded your current quota, please check your plan and billing details. For more information on this "
    "error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)


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


class Credit:
    """A prepaid token balance that, once it could not cover a request, refuses everything until topped up.

    Sticky on purpose: OpenAI refuses every call of an account out of credit,
    a small one included, so a client cannot sneak cheap calls through and
    must stop. ``tokens=None`` is unlimited. ``spend`` holds the balance's lock
    around the rate limiter's decision, so concurrent requests can never
    together spend more than the balance.
    """

    def __init__(self, tokens: int | None) -> None:
        self.initial = tokens
        self._lock = threading.Lock()
        self.clear()

    def spend(self, tokens: int, admit: Callable[[], Admission]) -> Admission | None:
        """``admit()`` and, if admitted, charge ``tokens``; ``None`` when the balance cannot cover them."""
        with self._lock:
            if self.left is not None and (self._dry or tokens > self.left):
                self._dry = True
                self.refused += 1
                return None
            admission = admit()
            if admission.wait == 0 and self.left is not None:
                self.left -= tokens
            return admission

    def topup(self, tokens: int) -> int | None:
        """Add ``tokens`` and lift the refusal (the next request that does not fit sets it again)."""
        with self._lock:
            if self.left is not None:
                self.left += tokens
            self._dry = False
            return self.left

    def clear(self) -> None:
        """Back to the starting balance (used by ``/_reset``)."""
        with self._lock:
            self.left, self._dry, self.refused = self.initial, False, 0


def _out_of_credit() -> Reply:
    reply = _error(429, OUT_OF_CREDIT, "insufficient_quota", "insufficient_quota")
    reply.refused = True
    return reply


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
        credit_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.limiter = SlidingWindowLimiter(window_s, {"tokens": tpm, "requests": rpm})
        self.tpm, self.rpm, self.window_s = tpm, rpm, window_s
        self.key = key
        self.completion_tokens = completion_tokens
        self.latency_s = latency_ms / 1000
        self.faults = Faults(_fault_error, state_file)
        self.credit = Credit(credit_tokens)

    def admin(self, request: Request) -> Reply:
        """The shared admin endpoints, plus ``POST /_topup`` ``{"tokens": N}`` to add credit."""
        if (request.method, request.path) != ("POST", "/_topup"):
            return super().admin(request)
        try:
            tokens = request.json().get("tokens")
        except (ValueError, AttributeError):
            tokens = None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            return json_reply(400, {"error": 'body must be {"tokens": N} with N a positive integer'})
        return json_reply(200, {"credit_left": self.credit.topup(tokens)})

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
        admission = self.credit.spend(
            usage["total_tokens"], lambda: self.limiter.try_admit({"tokens": usage["total_tokens"], "requests": 1})
        )
        if admission is None:
            return _out_of_credit()
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
            reply.refused = True
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
            "refused": sum(1 for a in arrivals if a["refused"]),
            "credit_left": self.credit.left,
            "refused_for_credit": self.credit.refused,
            "first_t": min((a["t"] for a in arrivals), default=None),
            "last_t": max((a["t"] for a in arrivals), default=None),
        }

    def reset(self) -> None:
        """Clear arrivals, both budgets and the fault heal counters; restore the starting credit."""
        super().reset()
        self.limiter.clear()
        self.faults.clear()
        self.credit.clear()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve forever."""
    parser = service_parser("OpenAI-compatible chat completions with token and request budgets.")
    parser.add_argument("--tpm", type=float, default=None, help="tokens per window (default unlimited)")
    parser.add_argument("--rpm", type=float, default=None, help="requests per window (default unlimited)")
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument(
        "--credit-tokens", type=int, default=None, help="prepaid tokens; spent, every call is insufficient_quota"
    )
    args = parser.parse_args(argv)
    service = LocalLlm(
        args.tpm,
        args.rpm,
        args.window_s,
        args.key,
        args.completion_tokens,
        args.latency_ms,
        args.state_file,
        args.credit_tokens,
    )
    serve(service, args.port, args.watch_stdin)


if __name__ == "__main__":
    main()
