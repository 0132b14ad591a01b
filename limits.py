"""Limits as data: each knows its name, its value and its current use.

One :class:`Limits` holds every limit of a server, so a refusal's message,
``/status``'s ``limits`` and ``deskhive_refusals_total{limit}`` all say the
same thing. The rate limits are token buckets (:class:`TokenBucket`, and
:class:`KeyedBuckets` for one bucket per client address); password
guessing is slowed by :class:`FailureThrottle`.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, Final

import attrs

from protocol.errors import QuotaExceeded

#: Keys (client addresses, usernames) a keyed limiter remembers at most.
MAX_KEYS: Final = 100_000


@attrs.define(kw_only=True)
class Limit:
    """One limit: *value* 0 means off; *use* reads what is in use now, where that means something."""

    name: str
    value: float
    what: str
    use: Callable[[], float] | None = None
    refused: int = 0

    def refuse(self, detail: str = "") -> QuotaExceeded:
        """Count a refusal and make the error that tells the client about it."""
        self.refused += 1
        value = int(self.value) if float(self.value).is_integer() else self.value
        return QuotaExceeded(f"{self.what} ({self.name} = {value}){': ' + detail if detail else ''}")


class Limits:
    """Every limit of one server, by name."""

    def __init__(self) -> None:
        self._limits: dict[str, Limit] = {}

    def add(self, name: str, value: float, what: str, use: Callable[[], float] | None = None) -> Limit:
        limit = self._limits[name] = Limit(name=name, value=value, what=what, use=use)
        return limit

    def __getitem__(self, name: str) -> Limit:
        return self._limits[name]

    def __iter__(self) -> Any:
        return iter(self._limits.values())

    def status(self) -> dict[str, dict[str, float | None]]:
        """``{name: {"value", "use"}}`` for ``/status``."""
        return {
            limit.name: {"value": limit.value, "use": limit.use() if limit.use is not None else None}
            for limit in self._limits.values()
        }


class TokenBucket:
    """*rate* tokens a second, at most *burst* saved up; ``take`` spends one if there is one."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self._rate, self._burst = rate, burst
        self._tokens = burst
        self._last = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> bool:
        if self._tokens >= 1.0:
            # The common case costs no clock reading: refill only when short.
            self._tokens -= 1.0
            return True
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def full(self) -> bool:
        return self._tokens >= self._burst


class KeyedBuckets:
    """One token bucket per key (a client address), remembering at most ``MAX_KEYS`` keys."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate, self._burst = rate, burst
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()


class FailureThrottle:
    """After *count* failures within *window* seconds for a key, refuse it until *window* after the first.

    Used for passwords, per username and per client address: a locked key
    is refused whether or not its next password is right.
    """

    def __init__(self, count: int = 10, window: float = 60.0) -> None:
        self.count, self.window = count, window
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def locked(self, key: Hashable, now: float | None = None) -> bool:
        failures = self._failures.get(key)
        if failures is None:
            return False
        now = time.monotonic() if now is None else now
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return False
        return len(failures) >= self.count

    def failed(self, key: Hashable, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._failures.setdefault(key, deque(maxlen=self.count))
        self._failures.move_to_end(key)
        failures.append(now)
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)
