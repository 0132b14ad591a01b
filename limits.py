"""Limits as data: each knows its name, its value and its current use.

One :class:`Limits` holds every limit of a server, so a refusal's message,
``/status``'s ``limits`` and ``deskhive_refusals_total{limit}`` all say the
same thing. The rate limits are token buckets (:class:`TokenBucket`, and
:class:`KeyedBuckets` for one bucket per client address); password
guessing is slowed by :class:`FailureThrottle` (:class:`PasswordThrottle`
per username and per address); desktops running at once are counted by
:class:`DesktopGate`.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Final

import attrs

from protocol.errors import QuotaExceeded, Unauthorized

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

    def refuse(self, detail: str = "", *, request_id: str | None = None) -> QuotaExceeded:
        """Count a refusal and make the error that tells the client about it."""
        self.refused += 1
        value = int(self.value) if float(self.value).is_integer() else self.value
        text = f"{self.what} ({self.name} = {value}){': ' + detail if detail else ''}"
        return QuotaExceeded(text, request_id=request_id)

    @property
    def on(self) -> bool:
        return self.value > 0


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

    def refusals(self) -> dict[str, int]:
        """``{name: refusals so far}``, every limit listed (for ``deskhive_refusals_total``)."""
        return {limit.name: limit.refused for limit in self._limits.values()}

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
        #: Checks under way per key: each may be one more failure.
        self._checking: Counter[Hashable] = Counter()

    def _recent(self, key: Hashable, now: float | None) -> int:
        failures = self._failures.get(key)
        if failures is None:
            return 0
        now = time.monotonic() if now is None else now
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return len(failures)

    def locked(self, key: Hashable, now: float | None = None) -> bool:
        # Checks under way count as failures to be: four hundred guesses sent
        # at once must not all be checked before the first one fails.
        return self._recent(key, now) + self._checking.get(key, 0) >= self.count

    def retry_after(self, key: Hashable, now: float | None = None) -> float:
        """Seconds until the oldest failure of *key* leaves the window (0 if none)."""
        failures = self._failures.get(key)
        if not failures:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, failures[0] + self.window - now)

    def locked_keys(self, now: float | None = None) -> int:
        """How many keys are locked now (for ``/status``; walks every key)."""
        now = time.monotonic() if now is None else now
        return sum(1 for key in list(self._failures) if self.locked(key, now))

    def begin(self, key: Hashable) -> None:
        self._checking[key] += 1

    def end(self, key: Hashable) -> None:
        self._checking[key] -= 1
        if self._checking[key] <= 0:
            del self._checking[key]

    def failed(self, key: Hashable, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._failures.setdefault(key, deque(maxlen=self.count))
        self._failures.move_to_end(key)
        failures.append(now)
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)


class PasswordThrottle:
    """Password guessing, per username and per client address (SPEC 1.1 "Limits").

    After ``count`` failures within ``window`` seconds for a username or an
    address, every attempt for it is refused, the right password included,
    until ``window`` after the first of them.
    """

    def __init__(self, per_user: Limit, per_address: Limit, window: float = 60.0) -> None:
        self.window = window
        self._gates = (
            (per_user, FailureThrottle(int(per_user.value), window)),
            (per_address, FailureThrottle(int(per_address.value), window)),
        )
        per_user.use = self._gates[0][1].locked_keys
        per_address.use = self._gates[1][1].locked_keys

    @contextlib.contextmanager
    def attempt(self, username: str, address: str) -> Iterator[None]:
        """Refuse a locked username or address; count an ``Unauthorized`` inside as a failure."""
        keys = (username, address)
        for (limit, throttle), key in zip(self._gates, keys, strict=True):
            if throttle.locked(key):
                wait = throttle.retry_after(key)
                raise limit.refuse(f"try again in {max(1, round(wait))} s")
        for (_, throttle), key in zip(self._gates, keys, strict=True):
            throttle.begin(key)
        try:
            yield
        except Unauthorized:
            for (_, throttle), key in zip(self._gates, keys, strict=True):
                throttle.failed(key)
            raise
        finally:
            for (_, throttle), key in zip(self._gates, keys, strict=True):
                throttle.end(key)


class DesktopGate:
    """Desktops running at once, on the server and per username.

    *running(username)* gives ``(session_id, username)`` of the sessions (of
    that username, or of anyone for ``None``) whose desktop runs; a desktop
    being started holds its place from the check to the end of its start, so
    two starts at once cannot both take the last one.
    """

    def __init__(
        self,
        total: Limit,
        per_user: Limit,
        running: Callable[[str | None], Iterable[tuple[str, str]]],
    ) -> None:
        self.total, self.per_user = total, per_user
        self._running = running
        self._starting: dict[str, str] = {}
        total.use = lambda: len(self._holders(None))
        per_user.use = self._most_per_user

    def _holders(self, username: str | None) -> dict[str, str]:
        held = dict(self._running(username))
        held.update((s, u) for s, u in self._starting.items() if username is None or u == username)
        return held

    def _most_per_user(self) -> int:
        return max(Counter(self._holders(None).values()).values(), default=0)

    @contextlib.contextmanager
    def starting(self, session_id: str, username: str) -> Iterator[None]:
        """Hold a place for *session_id*'s desktop while it starts, or refuse past a limit."""
        if self.total.on and len(self._holders(None)) >= self.total.value:
            raise self.total.refuse("stop a desktop or try again later")
        if self.per_user.on and len(self._holders(username)) >= self.per_user.value:
            raise self.per_user.refuse(f"user {username!r} runs as many; stop one first")
        self._starting[session_id] = username
        try:
            yield
        finally:
            self._starting.pop(session_id, None)


class LoginGate:
    """What a login passes before a session is made: the per-address rate and the password throttle."""

    def __init__(
        self, limits: Limits, logins_per_minute: int, failures: int = 10, window: float = 60.0
    ) -> None:
        self.rate = limits.add("logins_per_minute", logins_per_minute, "too many logins from this address")
        n = logins_per_minute
        self._buckets = KeyedBuckets(n / 60.0, n) if n > 0 else None
        per_user = limits.add(
            "password_failures_per_user",
            failures,
            f"too many wrong passwords for this username within {window:g} s",
        )
        per_address = limits.add(
            "password_failures_per_address",
            failures,
            f"too many wrong passwords from this address within {window:g} s",
        )
        self.passwords = PasswordThrottle(per_user, per_address, window)

    def admit(self, address: str) -> None:
        """Refuse a login from *address* over ``logins_per_minute``."""
        if self._buckets is not None and not self._buckets.take(address):
            raise self.rate.refuse(f"try again in {max(1, round(60.0 / self.rate.value))} s")
