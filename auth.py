"""Credentials: session tokens, stream tokens, usernames and passwords.

- A session token is 256 random bits; only its SHA-256 is kept (a fast hash
  is right for a random secret of that size).
- A stream token is an HMAC of the session id under a key that lives only in
  the server's memory, so it is never stored and never inside a sandbox.
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

from protocol import fields
from protocol.errors import ProtocolError, Unauthorized

USERNAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
#: Threads checking passwords at once (scrypt takes a core each for ~50 ms).
PASSWORD_THREADS: Final = 2
StreamMode = Literal["control", "view"]


def check_username(username: object) -> str:
    """Return *username* if it follows the rules, else raise ``ProtocolError``."""
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise ProtocolError("username must be 1-32 characters of letters, digits, '.', '_' or '-'")
    return username


def new_session_id(username: str) -> str:
    return f"{username}_{int(time.time())}_{secrets.token_hex(8)}"


def new_token() -> str:
    return secrets.token_urlsafe(32)


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


class StreamTokens:
    """Per-session desktop stream tokens, derived rather than stored."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, session_id: str, mode: StreamMode = "control") -> str:
        mac = hmac.new(self._key, f"{mode}:{session_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def mode(self, session_id: str, token: str) -> StreamMode:
        """Which access *token* grants to the session's stream, else ``Unauthorized``."""
        # compare_digest refuses str with non-ASCII characters: check the shape first.
        if fields.is_token(token):
            for mode in ("control", "view"):
                if hmac.compare_digest(self.token(session_id, mode), token):
                    return mode
        raise Unauthorized(f"wrong stream token for session {session_id}")


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
        if not isinstance(password, str) or not password:
            raise Unauthorized("a password is required")
        encoded = self._hashes.get(username, self._decoy)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(PASSWORD_THREADS, "password")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, verify_password, password, encoded)
        if not ok or username not in self._hashes:
            raise Unauthorized("wrong username or password")
