"""Credentials: session tokens, stream tokens, usernames and passwords.

- A session token is 256 random bits; only its SHA-256 is kept (a fast hash
  is right for a random secret of that size).
- A share token is a session token's equal (256 random bits, only its hash
  kept); it grants a guest ``view`` or ``control`` of one session.
- A stream token opens one desktop run's stream for one grant (the owner or
  one share): an HMAC of the session id, the run, the grant and its mode
  under a key that lives only in the server's memory, so it is never stored
  and never inside a sandbox, and dies with the run (``kill_desktop``, a
  restart) or the share (revocation). It travels as a WebSocket subprotocol,
  never in a URL's query, which reverse proxies log.
- Passwords (users file) are checked against salted scrypt hashes, off the
  event loop, on the users file's own small thread pool: a flood of bad
  logins then waits for that pool alone, never for the default executor
  that everything else shares (nor the other way round).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path
from typing import Final, Literal

import attrs

from protocol import fields
from protocol.errors import ProtocolError, Unauthorized

USERNAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
#: Threads checking passwords at once (scrypt takes a core each for ~50 ms).
PASSWORD_THREADS: Final = 2
StreamMode = Literal["control", "view"]
#: The grant of a session's own token in stream tokens (shares use their id).
OWNER_GRANT: Final = "owner"
#: The WebSocket subprotocol that carries a stream token: ``deskhive.stream.<token>``.
STREAM_PROTOCOL_PREFIX: Final = "deskhive.stream."


def check_username(username: object) -> str:
    """Return *username* if it follows the rules, else raise ``ProtocolError``."""
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise ProtocolError("username must be 1-32 characters of letters, digits, '.', '_' or '-'")
    return username


def new_session_id(username: str) -> str:
    return f"{username}_{int(time.time())}_{secrets.token_hex(8)}"


def new_token() -> str:
    """A session or share token: 256 random bits."""
    return secrets.token_urlsafe(32)


def new_share_id() -> str:
    """A share's public name (not a credential)."""
    return f"sh_{secrets.token_hex(8)}"


def token_hash(token: str) -> bytes:
    """The stored form of *token*; any string has one (a malformed token is only wrong)."""
    # surrogatepass: a hello may carry a lone surrogate, which no token of ours holds.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header, else ``Unauthorized``.

    aiohttp hands bytes that are not UTF-8 over as lone surrogates; the
    token grammar (visible ASCII) refuses them with the rest.
    """
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not fields.is_token(token):
        raise Unauthorized("an 'Authorization: Bearer <token>' header is required")
    return token


@attrs.frozen
class StreamGrant:
    """What a stream token names before it is checked: a grant and a desktop run."""

    grant: str
    run: int


class StreamTokens:
    """Desktop stream tokens, derived rather than stored: ``<grant>.<run>.<mac>``."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(
        self, session_id: str, mode: StreamMode = "control", *, run: int = 0, grant: str = OWNER_GRANT
    ) -> str:
        """The token of *grant* for desktop *run* (run 0 is no desktop: never accepted)."""
        return f"{grant}.{run}.{self._mac(session_id, mode, run, grant)}"

    def _mac(self, session_id: str, mode: StreamMode, run: int, grant: str) -> str:
        message = f"{mode}:{session_id}:{run}:{grant}".encode()
        mac = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    @staticmethod
    def parse(token: str) -> StreamGrant:
        """The grant and run *token* claims, else ``Unauthorized``; its MAC is checked by ``check``."""
        grant, _, rest = token.partition(".")
        run, _, mac = rest.partition(".")
        if not (fields.is_token(token) and grant and mac and run.isdigit() and len(run) < 12):
            raise Unauthorized("malformed stream token")
        return StreamGrant(grant, int(run))

    def check(self, session_id: str, token: str, mode: StreamMode, run: int) -> None:
        """Raise ``Unauthorized`` unless *token* is the one for this run and grant's *mode*."""
        claim = self.parse(token)
        expected = self.token(session_id, mode, run=run, grant=claim.grant)
        # Both are ASCII (parse checked the shape), which compare_digest needs.
        if run <= 0 or not hmac.compare_digest(expected, token):
            raise Unauthorized(f"wrong or outdated stream token for session {session_id}")


def stream_token_of(protocols: list[str]) -> str:
    """The stream token among a handshake's ``Sec-WebSocket-Protocol`` values, else ``Unauthorized``."""
    for value in protocols:
        for protocol in value.split(","):
            protocol = protocol.strip()
            if protocol.startswith(STREAM_PROTOCOL_PREFIX):
                return protocol.removeprefix(STREAM_PROTOCOL_PREFIX)
    raise Unauthorized(
        f"a stream token is required, as the WebSocket subprotocol '{STREAM_PROTOCOL_PREFIX}<token>'"
    )


# --------------------------------------------------------------------------
# Passwords


def hash_password(password: str) -> str:
    """A users-file hash: ``scrypt$N$r$p$salt$key`` (base64 parts)."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 * 1024 * 1024,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


class UsersFile:
    """``username:scrypt$...`` lines; ``#`` starts a comment."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        # Unknown users still cost one scrypt, so timing does not tell them apart.
        self._decoy = hash_password(secrets.token_urlsafe(16))
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the password threads (checks under way finish first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @classmethod
    def load(cls, path: Path) -> UsersFile:
        hashes: dict[str, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            username, sep, encoded = line.partition(":")
            if not sep or not USERNAME_RE.fullmatch(username) or not encoded.startswith("scrypt$"):
                raise ValueError(f"{path}:{number}: expected 'username:scrypt$...'")
            hashes[username] = encoded
        return cls(hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    async def check(self, username: str, password: object) -> None:
        """Raise ``Unauthorized`` unless *password* is *username*'s."""
        if password is not None and not isinstance(password, str):
            raise ProtocolError("field 'password' must be a string")
        if not password:
            raise Unauthorized("a password is required")
        encoded = self._hashes.get(username, self._decoy)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(PASSWORD_THREADS, "password")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, verify_password, password, encoded)
        if not ok or username not in self._hashes:
            raise Unauthorized("wrong username or password")
