"""What a call is charged against the token budget before it runs.

A token budget is spent by calls whose cost is only known afterwards, from
the ``usage`` the response reports. The pacer charges each call an estimate
when it starts and reconciles with the real usage when it returns, so over a
run the schedule follows what calls really cost. This class picks the
estimate: the work's own per-item estimate where it has one (an LLM prompt
plus ``max_tokens`` is an upper bound), scaled by what such estimates turned
out to cost so far, else the mean usage measured so far, starting from the
declared ``tokens_per_item``. A declaration 2x off is therefore wrong for one
call, not for the run.

Why scale the per-item estimate rather than only reconcile it: a refund
arrives one latency after its call started, so a worker charged 2x per call
can only start a call when a refund comes back, and locks into fewer calls
in flight than its pace needs (measured: 0.85 of the token target, 300 ms
calls, estimates 2x high). Charged what calls really cost, the worker has
nothing to wait for but its pace. The estimate still orders items by size,
and the ratio corrects its bias.

    cost = TokenCost(declared=600)
    cost.charge(None)       # -> 600 before anything is measured
    cost.on_usage(300)
    cost.charge(None)       # -> 300
    cost.on_usage(50, estimate=100)
    cost.charge(80)         # -> 40: this work's estimates came out at half
"""

from __future__ import annotations


class TokenCost:
    """Running mean of reported usage, and of usage over the work's own estimates. Pure: no clock."""

    __slots__ = ("declared", "calls", "total", "estimated", "estimated_used")

    def __init__(self, declared: float | None):
        self.declared = declared
        self.calls = 0
        self.total = 0.0
        self.estimated = 0.0  # sum of the per-item estimates of calls that reported usage ...
        self.estimated_used = 0.0  # ... and what those calls used

    @property
    def per_call(self) -> float | None:
        """Tokens per call: measured once any call reported usage, else the declaration."""
        return self.total / self.calls if self.calls else self.declared

    def charge(self, item_estimate: float | None) -> float:
        """Tokens to charge the schedule for the next call."""
        if item_estimate is not None:
            return item_estimate * self.estimated_used / self.estimated if self.estimated else item_estimate
        return self.per_call or 0.0

    def on_usage(self, tokens: float, estimate: float | None = None) -> None:
        """A call reported ``tokens``; ``estimate`` is the work's own estimate for its item, if it had one."""
        self.calls += 1
        self.total += tokens
        if estimate:
            self.estimated += estimate
            self.estimated_used += tokens

    def __repr__(self) -> str:
        ratio = f", estimates x {self.estimated_used / self.estimated:.2f}" if self.estimated else ""
        return f"<TokenCost {self.per_call or 0:.1f} tokens/call over {self.calls} calls (declared {self.declared}){ratio}>"
