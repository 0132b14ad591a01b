"""Limits as data: token buckets, the password throttle, and refusals that name their limit."""

from __future__ import annotations

from limits import FailureThrottle, KeyedBuckets, Limits, TokenBucket


def test_bucket_allows_its_burst_then_its_rate() -> None:
    """A bucket spends its burst at once, then refills at its rate and no faster."""
    bucket = TokenBucket(rate=10, burst=20, now=0.0)
    assert all(bucket.take(0.0) for _ in range(20))
    assert not bucket.take(0.0)
    assert bucket.take(0.1)  # one token came back after a tenth of a second
    assert not bucket.take(0.1)


def test_keyed_buckets_keep_addresses_apart() -> None:
    """One client address out of tokens does not refuse another."""
    buckets = KeyedBuckets(rate=1 / 60, burst=2)
    assert buckets.take("10.0.0.1") and buckets.take("10.0.0.1")
    assert not buckets.take("10.0.0.1")
    assert buckets.take("10.0.0.2")


def test_throttle_locks_after_ten_failures_until_a_minute_after_the_first() -> None:
    """Ten failures within 60 s lock the key; it opens 60 s after the first of them."""
    throttle = FailureThrottle(count=10, window=60)
    for i in range(9):
        throttle.failed("alice", now=float(i))
    assert not throttle.locked("alice", now=9.0)
    throttle.failed("alice", now=9.0)
    assert throttle.locked("alice", now=10.0)
    assert throttle.locked("alice", now=59.9)
    assert not throttle.locked("alice", now=60.0)
    assert not throttle.locked("bob", now=10.0)


def test_refusal_names_the_limit_and_its_value_and_is_counted() -> None:
    """The error of a refusal says which limit and its value; status shows value, use and nothing secret."""
    limits = Limits()
    limit = limits.add("max_sessions", 50000, "the server holds as many sessions as it may", use=lambda: 7)
    error = limit.refuse()
    assert error.code == "rate_limited" and error.status == 429
    assert "max_sessions = 50000" in error.message
    assert limit.refused == 1
    assert limits.status() == {"max_sessions": {"value": 50000, "use": 7}}
