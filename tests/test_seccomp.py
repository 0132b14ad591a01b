"""The jails' seccomp filter: refused calls answer EPERM inside a command, the rest still works."""

from __future__ import annotations

import base64
import errno
import json
import platform
import shutil
import struct
from collections.abc import Callable

import pytest

from sandboxes.local import LocalSandbox, seccomp
from tests.test_local_sandbox import run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

Make = Callable[..., LocalSandbox]

#: The kernel's own numbers, written out again here so that a wrong number in
#: the filter is caught rather than copied.
NUMBERS = {
    "x86_64": {
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320,
        "bpf": 321, "keyctl": 250, "add_key": 248, "request_key": 249, "unshare": 272, "clone": 56,
        "clone3": 435,
    },
    "aarch64": {
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294,
        "bpf": 280, "keyctl": 219, "add_key": 217, "request_key": 218, "unshare": 97, "clone": 220,
        "clone3": 435,
    },
}  # fmt: skip
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17

#: Runs inside the jail under Debian's python3: calls each syscall with
#: arguments that make it fail fast however it is handled, and prints errno.
PROBE = r"""
import ctypes, json, os, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
numbers = json.loads(sys.argv[1])
NEWUSER, SIGCHLD = 0x10000000, 17
seen = {}
def call(name, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(numbers[name]), *map(ctypes.c_long, args))
    if ret == 0 and name == "clone":
        os._exit(0)  # a child made after all: leave at once
    if ret > 0 and name == "clone":
        os.waitpid(ret, 0)
    seen[name] = ctypes.get_errno() if ret < 0 else "ok"
params = ctypes.create_string_buffer(120)
call("io_uring_setup", 4, ctypes.addressof(params))
call("io_uring_enter", 0, 0, 0, 0, 0, 0)
call("io_uring_register", 0, 0, 0, 0)
attr = ctypes.create_string_buffer(128)
call("perf_event_open", ctypes.addressof(attr), 0, -1, -1, 0)
call("userfaultfd", 0)
call("kexec_load", 0, 0, 0, 0)
call("kexec_file_load", -1, -1, 0, 0, 0)
call("bpf", 0, 0, 0)
call("keyctl", 0, 0, 0, 0, 0)
call("add_key", 0, 0, 0, 0, 0)
call("request_key", 0, 0, 0, 0)
call("unshare", NEWUSER)
call("clone", NEWUSER | SIGCHLD, 0, 0, 0, 0)
call("clone3", 0, 0)
# Ordinary life: a thread, a fork, a subprocess.
t = threading.Thread(target=lambda: None); t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
seen["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
seen["subprocess"] = subprocess.run(["/bin/echo", "fine"], capture_output=True, text=True).stdout.strip()
print(json.dumps(seen))
"""

REFUSED = [
    "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "bpf", "keyctl", "add_key", "request_key", "unshare", "clone",
]  # fmt: skip


def host_numbers() -> dict[str, int]:
    machine = platform.machine().lower()
    if machine not in NUMBERS:
        pytest.skip(f"no syscall table for {machine} in this test")
    return NUMBERS[machine]


async def test_each_refused_call_answers_eperm_inside_a_command(make: Make) -> None:
    """io_uring, perf_event_open, userfaultfd, kexec, bpf, key rings and user namespaces fail with EPERM."""
    script = base64.b64encode(PROBE.encode()).decode()
    cmd = f"echo {script} | base64 -d > probe.py && python3 probe.py '{json.dumps(host_numbers())}'"
    code, out = await run(make("ada"), cmd)
    assert code == 0, out.text()
    seen = json.loads(out.text("stdout"))
    assert {name: seen[name] for name in REFUSED} == dict.fromkeys(REFUSED, errno.EPERM)
    # clone3 cannot be checked by flags: ENOSYS sends the C library back to clone.
    assert seen["clone3"] == errno.ENOSYS
    assert (seen["fork"], seen["subprocess"]) == (7, "fine")


async def test_user_namespaces_cannot_be_made_by_the_usual_tools(make: Make) -> None:
    """``unshare -U`` fails inside a command while ordinary programs (a pipe, python threads) work."""
    code, out = await run(make("ada"), "unshare -U true; echo rc=$?; seq 3 | wc -l")
    assert code == 0
    assert out.text("stdout").split() == ["rc=1", "3"]
    assert "Operation not permitted" in out.text("stderr")


async def test_the_sessions_chromium_runs_without_its_own_sandbox_and_without_a_warning_bar(
    make: Make,
) -> None:
    """Debian's launcher gets --no-sandbox (no user namespaces here) and --test-type (no warning bar)."""
    code, out = await run(make("ada"), 'for f in /etc/chromium.d/*; do . "$f"; done; echo "$CHROMIUM_FLAGS"')
    assert code == 0
    assert {"--no-sandbox", "--test-type"} <= set(out.text("stdout").split())


async def test_chromium_dumps_a_local_page_under_the_filter(make: Make) -> None:
    """Plain ``chromium --headless --dump-dom`` of a local page works in a session, under the filter."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    # Browsers reserve far more address space than they use: bound real
    # memory (the session's cgroup) instead of RLIMIT_AS here.
    from sandboxes.base import Limits

    sandbox = make("ada", limits=Limits(memory_bytes=0))
    argv = "chromium --headless --disable-gpu --disable-dev-shm-usage --dump-dom"
    page = "echo '<p id=x>hello from a page</p>' > page.html"
    code, out = await run(sandbox, f"{page} && {argv} file://$HOME/page.html 2>/dev/null", timeout=60)
    assert code == 0, out.text()
    assert "hello from a page" in out.text("stdout")


# -- the program itself, run by a small classic-BPF interpreter ---------------


def evaluate(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """What the kernel would return for one call, given the filter *program*."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize(("abi", "machine"), [(seccomp.X86_64, "x86_64"), (seccomp.AARCH64, "aarch64")])
def test_the_program_refuses_what_it_names_and_allows_the_rest(abi: seccomp.Abi, machine: str) -> None:
    """Per architecture: listed calls, CLONE_NEWUSER, foreign ABIs get EPERM; clone3 ENOSYS; others pass."""
    program, numbers = seccomp.program(abi), NUMBERS[machine]
    eperm, allow = 0x00050000 | errno.EPERM, seccomp.RET_ALLOW
    for name in REFUSED[:-2]:
        assert evaluate(program, abi.audit_arch, numbers[name]) == eperm, name
    for name in ("unshare", "clone"):
        assert evaluate(program, abi.audit_arch, numbers[name], CLONE_NEWUSER | SIGCHLD) == eperm
        assert evaluate(program, abi.audit_arch, numbers[name], SIGCHLD) == allow
    assert evaluate(program, abi.audit_arch, numbers["clone3"]) == 0x00050000 | errno.ENOSYS
    assert evaluate(program, abi.audit_arch, 0) == allow  # read / io_setup
    assert evaluate(program, 0x40000003, 1) == eperm  # i386 (or arm32 on aarch64)
    if machine == "x86_64":
        assert evaluate(program, abi.audit_arch, 0x40000000 | 39) == eperm  # x32 getpid
