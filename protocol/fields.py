"""The input grammar: what each kind of client text may hold, said once.

The codec (frames and HTTP bodies), the workflow loader (files) and the
local sandbox (its last check before it runs anything) all ask this module,
so a value one of them accepts is never refused by another.

- A *label* (a request ``id``, a ``cancel`` target) is only compared and
  echoed: any JSON string of 1-64 characters that is not blank, lone
  surrogates and NUL included (the encoders escape what UTF-8 cannot carry).
- *Text* (a command, a query, a URL) reaches a shell, a model or a desktop:
  any string without NUL and without lone surrogates (``\\ud800``-``\\udfff``
  not part of a pair), which neither argv nor UTF-8 can carry. It may use
  the whole frame.
- A *name* (a workflow) is 1-64 of ``[A-Za-z0-9_.-]``, starting with a
  letter or digit: the workflow's file name.
- A *token* (``Authorization: Bearer``, the desktop stream's ``?token=``)
  is 1-512 visible ASCII characters; ours are URL-safe base64.
- A *package* is ``NAME``, a Debian package (Debian policy: lowercase
  letters, digits, ``+ - .``, at least two characters, starting with a
  letter or digit), or ``pip:REQ``, a Python package with optional extras
  and version specifiers (``pip:numpy``, ``pip:numpy==2.0``,
  ``pip:requests[socks]>=2.31,<3``): no URL, no environment marker, no
  space, nothing an installer would read as an option.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import attrs

#: The largest client frame or HTTP body, in bytes of UTF-8 (inclusive).
MAX_FRAME_BYTES: Final = 64 * 1024
MAX_LABEL_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 512
#: Text may use the whole frame: no field limit below the frame's own.
MAX_TEXT_CHARS: Final = MAX_FRAME_BYTES
MAX_PACKAGES: Final = 64
MAX_PACKAGE_CHARS: Final = 128
MAX_TIMEOUT_S: Final = 86_400.0

NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOKEN: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN_CHARS}}}")
DEBIAN_PACKAGE: Final = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_PIP_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_PIP_EXTRAS = rf"\[{_PIP_NAME}(?:,{_PIP_NAME})*\]"
_PIP_SPEC = r"(?:===|==|!=|<=|>=|~=|<|>)[A-Za-z0-9][A-Za-z0-9.*+!_-]*"
#: A PEP 508 requirement without URL or marker: name, extras, specifiers.
PIP_REQUIREMENT: Final = re.compile(rf"{_PIP_NAME}(?:{_PIP_EXTRAS})?(?:{_PIP_SPEC}(?:,{_PIP_SPEC})*)?")
PIP_PREFIX: Final = "pip:"

DESCRIBE_PACKAGE: Final = (
    "a package: a Debian package name (lowercase, e.g. 'jq') "
    "or 'pip:' then a Python requirement (e.g. 'pip:numpy==2.0')"
)


def text_problem(value: str) -> str | None:
    """Why *value* cannot reach a sandbox, or ``None`` when it can."""
    if "\x00" in value:
        # argv, a shell and C strings end at NUL: the rest would vanish silently.
        return "text without NUL characters"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "text without unpaired surrogate characters (\\ud800-\\udfff)"
    return None


def is_label(value: object) -> bool:
    """Whether *value* may be a request id or a cancel target."""
    return isinstance(value, str) and 0 < len(value) <= MAX_LABEL_CHARS and not value.isspace()


def is_name(value: object) -> bool:
    """Whether *value* may name a workflow."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def is_token(value: object) -> bool:
    """Whether *value* has the shape of a token (it may still be wrong)."""
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


@attrs.frozen
class Package:
    """One package asked for: which installer takes it and what it is told."""

    manager: Literal["apt", "pip"]
    #: The Debian package name, or the pip requirement (without ``pip:``).
    spec: str


def parse_package(value: object) -> Package | None:
    """The package *value* names, or ``None`` when it is not one."""
    if not isinstance(value, str) or len(value) > MAX_PACKAGE_CHARS:
        return None
    if value.startswith(PIP_PREFIX):
        requirement = value.removeprefix(PIP_PREFIX)
        return Package("pip", requirement) if PIP_REQUIREMENT.fullmatch(requirement) else None
    return Package("apt", value) if DEBIAN_PACKAGE.fullmatch(value) else None


def is_package(value: object) -> bool:
    """Whether *value* is a package every part of deskhive takes."""
    return parse_package(value) is not None
