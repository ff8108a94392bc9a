"""Hosted-API rate limiting with a fake clock: bursts, steady rates, 429 penalties, settling, backoff."""

from __future__ import annotations

import pytest

from rollout_plugin.errors import ConfigError
from rollout_plugin.pool.policy.ratelimit import RateLimiter, RateLimits, TokenBucket, backoff_delay


def send_times(limiter: RateLimiter, n: int, tokens: int = 0, start: float = 0.0, gap: float = 0.0) -> list[float]:
    """Callers arriving every ``gap`` seconds from ``start``; each goes at arrival + the reserved delay."""
    out = []
    for i in range(n):
        now = start + i * gap
        out.append(now + limiter.reserve(now, requests=1, tokens=tokens))
    return out


def test_a_burst_up_to_capacity_goes_at_once_and_the_next_call_waits():
    limiter = RateLimiter(RateLimits(rpm=120, burst_s=10))  # 2/s, bucket of 20
    times = send_times(limiter, 21)
    assert times[:20] == [0.0] * 20
    assert times[20] == pytest.approx(0.5)  # one request's worth of refill at 2/s


@pytest.mark.parametrize("rpm", [30.0, 600.0, 10_000.0])
def test_steady_request_rate_matches_rpm(rpm):
    limiter = RateLimiter(RateLimits(rpm=rpm, burst_s=5))
    burst = int(rpm / 60 * 5)
    times = send_times(limiter, burst + 2000)[burst:]
    rate_per_min = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert rate_per_min == pytest.approx(rpm, rel=0.01)


def test_steady_token_rate_matches_tpm_with_uneven_calls():
    tpm = 90_000.0
    limiter = RateLimiter(RateLimits(tpm=tpm, burst_s=1))
    sizes = [100, 700, 2500, 40, 1200] * 400
    now, sent = 0.0, []
    for size in sizes:
        sent.append((now + limiter.reserve(now, tokens=size), size))
    # Past the first bucketful, tokens released per minute equal tpm.
    capacity = tpm / 60
    steady = [(t, s) for t, s in sent if t > 0]
    span = steady[-1][0] - steady[0][0]
    tokens = sum(s for _, s in steady[1:])
    assert tokens / span * 60 == pytest.approx(tpm, rel=0.01)
    assert sum(s for t, s in sent if t == 0) <= capacity + max(sizes)


def test_the_slower_limit_wins_when_both_are_set():
    limiter = RateLimiter(RateLimits(rpm=6000, tpm=6000, burst_s=1))  # 100 req/s but only 100 tok/s
    times = send_times(limiter, 500, tokens=50)
    rate = (len(times) - 201) / (times[-1] - times[200])
    assert rate == pytest.approx(2.0, rel=0.01)  # 100 tok/s ÷ 50 tok per call


def test_unset_limits_never_delay():
    limiter = RateLimiter(RateLimits())
    assert send_times(limiter, 10_000, tokens=10**6) == [0.0] * 10_000


def test_a_429_holds_every_send_until_retry_after_and_resumes_at_the_steady_rate():
    limiter = RateLimiter(RateLimits(rpm=600, burst_s=60))  # 10/s, bucket of 600: plenty of burst left
    assert limiter.reserve(0.0) == 0.0
    assert limiter.penalize(1.0, retry_after_s=20.0) == 21.0
    times = send_times(limiter, 50, start=2.0, gap=0.01)
    assert min(times) >= 21.0
    # The provider's window was full, so no full-bucket burst after the penalty: 10/s from t=21.
    assert times[-1] == pytest.approx(21.0 + 50 / 10, rel=1e-9)


def test_a_429_holds_sends_even_when_no_limits_are_known():
    limiter = RateLimiter(RateLimits())  # limits unknown: the provider's 429s are the only signal
    limiter.penalize(3.0, retry_after_s=7.0)
    assert limiter.reserve(4.0, tokens=100) == pytest.approx(6.0)
    assert limiter.reserve(10.0) == 0.0


def test_a_caller_already_sleeping_is_held_by_a_later_429():
    limiter = RateLimiter(RateLimits(rpm=60, burst_s=1))  # 1/s, bucket of 1
    limiter.reserve(0.0)
    delay = limiter.reserve(0.0)
    assert delay == pytest.approx(1.0)
    limiter.penalize(0.5, retry_after_s=30.0)
    assert limiter.hold(delay) == pytest.approx(29.5)  # wakes at t=1, must wait until 30.5
    assert limiter.hold(30.5) == 0.0


def test_penalties_only_extend_and_a_missing_retry_after_still_backs_off():
    limiter = RateLimiter(RateLimits(rpm=600))
    limiter.penalize(0.0, retry_after_s=10.0)
    assert limiter.penalize(1.0, retry_after_s=2.0) == 10.0  # a shorter later penalty does not shorten
    assert limiter.penalize(5.0, retry_after_s=None) == 10.0
    assert RateLimiter(RateLimits(rpm=6)).penalize(0.0, None) == pytest.approx(10.0)  # one request's worth
    assert RateLimiter(RateLimits(tpm=1000)).penalize(0.0, None) == pytest.approx(1.0)


def test_settle_refunds_an_over_estimate_so_the_next_call_goes_sooner():
    limits = RateLimits(tpm=6000, burst_s=10)  # 100 tok/s, bucket of 1000
    settled, unsettled = RateLimiter(limits), RateLimiter(limits)
    for limiter in (settled, unsettled):
        assert limiter.reserve(0.0, tokens=1000) == 0.0  # estimate: prompt + max_tokens
    settled.settle(1.0, reserved_tokens=1000, actual_tokens=200)
    assert unsettled.reserve(1.0, tokens=500) == pytest.approx(4.0)  # 100 refilled, 400 short
    assert settled.reserve(1.0, tokens=500) == 0.0  # 800 refunded + 100 refilled


def test_settle_charges_an_under_estimate_and_never_overfills():
    limiter = RateLimiter(RateLimits(tpm=6000, burst_s=10))
    limiter.reserve(0.0, tokens=100)
    limiter.settle(0.0, reserved_tokens=100, actual_tokens=1100)
    assert limiter.tokens.available(0.0) == pytest.approx(-100)
    limiter.settle(100.0, reserved_tokens=10**6, actual_tokens=0)
    assert limiter.tokens.available(100.0) == pytest.approx(1000)  # capped at the bucket


def test_a_clock_stepping_back_neither_refills_nor_breaks():
    bucket = TokenBucket(rate_per_s=1.0, capacity=5.0, now=10.0)
    assert bucket.reserve(10.0, 5) == 0.0
    assert bucket.reserve(9.0, 1) == pytest.approx(2.0)  # ready at 11.0, two seconds after "now"
    assert bucket.available(9.5) == pytest.approx(-1.0)


def test_bad_limits_name_the_key():
    with pytest.raises(ConfigError) as err:
        RateLimits(rpm=0, tpm=-5)
    text = str(err.value)
    assert "rate_limit.rpm=0" in text and "rate_limit.tpm=-5" in text and "(try rate_limit.rpm=null)" in text
    with pytest.raises(ValueError):
        RateLimiter(RateLimits(rpm=60)).reserve(0.0, tokens=-1)


def test_backoff_grows_exponentially_and_is_capped():
    bounds = [backoff_delay(a, base_s=0.5, cap_s=30.0, rand=0.999999) for a in range(12)]
    for a in range(6):
        assert bounds[a] == pytest.approx(0.5 * 2**a, rel=1e-5)  # 0.5, 1, 2, … 16; 32 is past the cap
    for a in range(5):
        assert bounds[a + 1] == pytest.approx(2 * bounds[a], rel=1e-5)
    assert bounds[6:] == [pytest.approx(30.0, rel=1e-5)] * 6
    assert backoff_delay(10_000, base_s=0.5, cap_s=30.0, rand=0.5) == 15.0  # no overflow


def test_full_jitter_spans_zero_to_the_bound():
    delays = [backoff_delay(3, base_s=1.0, cap_s=60.0, rand=i / 1000) for i in range(1000)]
    assert min(delays) == 0.0
    assert max(delays) < 8.0 and max(delays) == pytest.approx(8.0, rel=0.01)
    assert delays == sorted(delays)  # linear in rand: uniform rand gives uniform delay
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            backoff_delay(1, 1.0, 10.0, bad)
    with pytest.raises(ValueError):
        backoff_delay(-1, 1.0, 10.0, 0.5)
