"""What a call is charged against the token budget before it runs.

A token budget is spent by calls whose cost is only known afterwards, from
the ``usage`` the response reports. The pacer charges each call an estimate
when it starts and reconciles with the real usage when it returns, so over a
run the schedule follows what calls really cost. This class picks the
estimate: the work's own per-item estimate where it has one (an LLM prompt
plus ``max_tokens`` is an upper bound), else the mean usage measured so far,
starting from the declared ``tokens_per_item``. A declaration 2x off is
therefore wrong for one call, not for the run.

    cost = TokenCost(declared=600)
    cost.charge(None)       # -> 600 before anything is measured
    cost.on_usage(300)
    cost.charge(None)       # -> 300
"""

from __future__ import annotations


class TokenCost:
    """Running mean of reported usage, used as the charge of calls with no estimate of their own."""

    __slots__ = ("declared", "calls", "total")

    def __init__(self, declared: float | None):
        self.declared = declared
        self.calls = 0
        self.total = 0.0

    @property
    def per_call(self) -> float | None:
        """Tokens per call: measured once any call reported usage, else the declaration."""
        return self.total / self.calls if self.calls else self.declared

    def charge(self, item_estimate: float | None) -> float:
        """Tokens to charge the schedule for the next call."""
        if item_estimate is not None:
            return item_estimate
        return self.per_call or 0.0

    def on_usage(self, tokens: float) -> None:
        self.calls += 1
        self.total += tokens

    def __repr__(self) -> str:
        return f"<TokenCost {self.per_call or 0:.1f} tokens/call over {self.calls} calls (declared {self.declared})>"
