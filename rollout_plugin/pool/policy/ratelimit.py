"""Client-side rate limits for hosted OpenAI-compatible APIs (pure: time is always passed in).

Hosted APIs state limits as requests-per-minute (RPM) and tokens-per-minute (TPM) and answer 429
when a window overflows. Staying under both on our side is cheaper than eating 429s, so every call
first asks :meth:`RateLimiter.reserve` how long to wait.

Reservations, not checks: ``reserve`` commits the call's share at once and returns the delay before
it may go, letting a bucket's level go negative. Concurrent callers therefore queue up in order
(each later caller sees the earlier debt) without a lock around "check, sleep, re-check".

Token counts are estimates when the call is made (prompt + ``max_tokens``, as providers count them
for admission); :meth:`RateLimiter.settle` corrects the bucket once the response's ``usage`` arrives.
A 429 with ``Retry-After`` goes to :meth:`RateLimiter.penalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rollout_plugin.errors import ConfigError, ConfigProblem

# 2**64 × any sane base is past any cap; bounding the exponent keeps 2.0**attempt from overflowing.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class RateLimits:
    """Limits as the provider states them; ``None`` means unlimited on that axis.

    ``burst_s``: how many seconds' worth of allowance may go at once. Providers state per-minute
    limits but some enforce them on shorter windows (60,000 RPM as 1,000 per second); lower
    ``burst_s`` for those so a cold start does not fire a whole minute's budget in one go.
    """

    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        for key, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                problems.append(ConfigProblem(f"rate_limit.{key}", value,
                                              "must be a positive number of per-minute units, or unset (no limit)",
                                              f"rate_limit.{key}=null"))
        if not (self.burst_s > 0 and math.isfinite(self.burst_s)):
            problems.append(ConfigProblem("rate_limit.burst_s", self.burst_s,
                                          "must be > 0 seconds of allowance", "rate_limit.burst_s=60"))
        if problems:
            raise ConfigError(problems)


class TokenBucket:
    """One bucket: ``rate`` units per second, holding at most ``capacity``; starts full.

    ``level`` may go negative: that is debt reserved by callers who have been told to wait.
    ``last`` may lie in the future after :meth:`drain_until`: nothing refills before it.
    """

    def __init__(self, rate_per_s: float, capacity: float, now: float = 0.0):
        if not (rate_per_s > 0 and capacity > 0):
            raise ValueError(f"rate_per_s and capacity must be > 0 (got {rate_per_s}, {capacity})")
        self.rate = float(rate_per_s)
        self.capacity = float(capacity)
        self.level = float(capacity)
        self.last = float(now)

    def _refill(self, now: float) -> None:
        # A clock that steps back (callers on different loops) must neither refill nor un-refill.
        if now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
            self.last = now

    def available(self, now: float) -> float:
        """Units that could go at ``now`` without waiting (negative: debt outstanding)."""
        self._refill(now)
        return self.level

    def reserve(self, now: float, amount: float) -> float:
        """Commit ``amount`` and return the seconds from ``now`` until the bucket covers it."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0 (got {amount})")
        self._refill(now)
        self.level -= amount
        # The reservation is covered when the level climbs back to zero, counted from `last`
        # (which is later than `now` while a penalty holds the bucket).
        ready_at = self.last + max(0.0, -self.level) / self.rate
        return max(0.0, ready_at - now)

    def credit(self, now: float, amount: float) -> None:
        """Give back (``amount`` > 0) or charge more (``amount`` < 0) after the fact."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def drain_until(self, now: float, until: float) -> None:
        """Empty the bucket and refill only from ``until`` on; debt already reserved is kept."""
        self._refill(now)
        self.level = min(self.level, 0.0)
        self.last = max(self.last, until)


class RateLimiter:
    """RPM and TPM buckets plus a 429 penalty; one per hosted endpoint (API key × model)."""

    def __init__(self, limits: RateLimits, now: float = 0.0):
        self.limits = limits
        self.requests = self._bucket(limits.rpm, limits.burst_s, now)
        self.tokens = self._bucket(limits.tpm, limits.burst_s, now)
        self.blocked_until = float("-inf")

    @staticmethod
    def _bucket(per_minute: float | None, burst_s: float, now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        rate = per_minute / 60.0
        # At least one unit of capacity, or a tiny limit with a short burst could never admit anything.
        return TokenBucket(rate, max(1.0, rate * burst_s), now)

    def reserve(self, now: float, requests: int = 1, tokens: int = 0) -> float:
        """Commit one call's share of both limits; return the seconds to wait before sending (0.0 = now).

        The caller must send no earlier than ``now + delay`` and, having slept, check :meth:`hold`.
        Both buckets are charged either way, so a call abandoned after reserving should
        :meth:`settle` its tokens back to zero.
        """
        if requests < 0 or tokens < 0:
            raise ValueError(f"requests and tokens must be >= 0 (got {requests}, {tokens})")
        delay = self.hold(now)
        if self.requests is not None:
            delay = max(delay, self.requests.reserve(now, requests))
        if self.tokens is not None:
            delay = max(delay, self.tokens.reserve(now, tokens))
        return delay

    def settle(self, now: float, reserved_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket once ``usage`` is known: refund an over-estimate, charge an under-estimate."""
        if self.tokens is not None:
            self.tokens.credit(now, float(reserved_tokens - actual_tokens))

    def penalize(self, now: float, retry_after_s: float | None) -> float:
        """A 429 arrived: no call goes before ``now + retry_after_s``; returns that time.

        The provider's window is full, so ours is emptied too: after the penalty, calls resume at
        the steady rate instead of bursting a full bucket straight into another 429.
        Without a ``Retry-After`` the penalty is one request's worth of time (at least a second).
        """
        if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s < 0:
            retry_after_s = max(1.0, 1.0 / self.requests.rate) if self.requests is not None else 1.0
        until = now + retry_after_s
        self.blocked_until = max(self.blocked_until, until)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.drain_until(now, self.blocked_until)
        return self.blocked_until

    def hold(self, now: float) -> float:
        """Seconds still to wait at ``now`` because of a penalty (0.0 = go).

        A caller that slept on an earlier ``reserve`` asks this before sending: a 429 may have
        arrived while it slept.
        """
        return max(0.0, self.blocked_until - now)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rand: float) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap_s, base_s × 2**attempt))``.

    ``attempt`` counts retries from 0; ``rand`` in [0, 1) comes from the caller's RNG, so this stays
    deterministic under test. Full jitter spreads retries of many callers that failed together.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1) (got {rand})")
    if base_s < 0 or cap_s < 0:
        raise ValueError(f"base_s and cap_s must be >= 0 (got {base_s}, {cap_s})")
    bound = min(cap_s, base_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rand * bound
