"""The seccomp filter every jail runs under, as a classic BPF program.

bubblewrap loads it (``--seccomp FD``) right before it starts the jail's
program, after its own namespace setup, so it binds everything the session
runs and nothing bwrap needs. The filter refuses, with ``EPERM`` (an error a
program can report, not a kill), the kernel surfaces a sandboxed program
has no business with and that keep turning up in local privilege escalations:

- io_uring (``io_uring_setup``, ``io_uring_enter``, ``io_uring_register``),
- ``perf_event_open``, ``userfaultfd``, ``bpf``,
- ``kexec_load``, ``kexec_file_load``,
- the key rings (``keyctl``, ``add_key``, ``request_key``),
- new user namespaces: ``unshare`` and ``clone`` with ``CLONE_NEWUSER``.

``clone3`` passes its flags in memory a filter cannot read, so it answers
``ENOSYS``: the C library then falls back to ``clone``, whose flags are
checked (as Flatpak and container runtimes do). Calls of another ABI than the
host's own (i386 or x32 on x86_64, arm32 on aarch64) would bypass the
numbers above, so all of them are refused.
"""

from __future__ import annotations

import errno
import functools
import platform
import struct
import subprocess

import attrs

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
#: Offsets in ``struct seccomp_data``: nr, arch, then the arguments (little-endian,
#: so the low 32 bits of argument 0 come first).
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
CLONE_NEWUSER = 0x10000000
_X32_SYSCALL_BIT = 0x40000000


@attrs.frozen(kw_only=True)
class Abi:
    """One architecture's audit number and the syscall numbers the filter names."""

    audit_arch: int
    refused: dict[str, int]
    clone: int
    clone3: int
    unshare: int
    #: Numbers at and above this one are another ABI's (x32); 0 for none.
    foreign_from: int = 0


X86_64 = Abi(
    audit_arch=0xC000003E,
    refused={
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "perf_event_open": 298, "userfaultfd": 323, "bpf": 321,
        "kexec_load": 246, "kexec_file_load": 320,
        "keyctl": 250, "add_key": 248, "request_key": 249,
    },
    clone=56, clone3=435, unshare=272, foreign_from=_X32_SYSCALL_BIT,
)  # fmt: skip
#: aarch64 uses the generic (asm-generic/unistd.h) numbers.
AARCH64 = Abi(
    audit_arch=0xC00000B7,
    refused={
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "perf_event_open": 241, "userfaultfd": 282, "bpf": 280,
        "kexec_load": 104, "kexec_file_load": 294,
        "keyctl": 219, "add_key": 217, "request_key": 218,
    },
    clone=220, clone3=435, unshare=97,
)  # fmt: skip
ABIS = {"x86_64": X86_64, "amd64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def _errno(code: int) -> bytes:
    return _insn(_RET_K, _RET_ERRNO | code)


def program(abi: Abi) -> bytes:
    """The filter for *abi*, as the ``struct sock_filter`` array bwrap reads."""
    out = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, abi.audit_arch, jt=1),
        _errno(errno.EPERM),  # another ABI: its numbers mean other calls
        _insn(_LD_W_ABS, _NR),
    ]
    if abi.foreign_from:
        out += [_insn(_JGE_K, abi.foreign_from, jf=1), _errno(errno.EPERM)]
    for nr in abi.refused.values():
        out += [_insn(_JEQ_K, nr, jf=1), _errno(errno.EPERM)]
    out += [_insn(_JEQ_K, abi.clone3, jf=1), _errno(errno.ENOSYS)]
    for nr in (abi.clone, abi.unshare):
        # If this call, look at its flags (this replaces the number, so the
        # branch ends here, allowing or refusing); else skip its 4 instructions.
        out += [
            _insn(_JEQ_K, nr, jf=4),
            _insn(_LD_W_ABS, _ARG0_LOW),
            _insn(_JSET_K, CLONE_NEWUSER, jf=1),
            _errno(errno.EPERM),
            _insn(_RET_K, RET_ALLOW),
        ]
    out.append(_insn(_RET_K, RET_ALLOW))
    return b"".join(out)


@functools.cache
def host_program() -> bytes:
    """The filter for this host's architecture; an error on one it does not know."""
    machine = platform.machine().lower()
    abi = ABIS.get(machine)
    if abi is None:
        raise RuntimeError(f"no seccomp filter for the {machine} architecture (x86_64 and aarch64 have one)")
    return program(abi)


@functools.cache
def bwrap_userns_args(bwrap: str) -> tuple[str, ...]:
    """bwrap's own switch against nested user namespaces, where this bwrap has it (0.8+).

    The filter refuses them either way; ``--disable-userns`` also covers
    ways in that do not go through ``clone`` or ``unshare`` flags.
    """
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("--unshare-user", "--disable-userns") if b"--disable-userns" in usage else ()
