"""Every external program the product and the tests start comes from a package the set-up installs.

The scan and its tables (``KNOWN``, ``REQUIRED``, ``NOT_PROGRAMS``) are in
``scripts/programs.py``; its docstring says how programs are found.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

from scripts.programs import KNOWN, ROOT, Kind, Scanner, installed, listed_packages, problems, scan

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not Debian: the list is Debian's")


def test_every_program_comes_from_a_listed_package() -> None:
    """Each program the code starts belongs to a package the set-up installs on a fresh machine."""
    found = problems(listed_packages())
    assert not found, "add the packages to scripts/install-system-packages.sh:\n" + "\n".join(found)


def test_a_package_missing_from_the_list_is_named() -> None:
    """Without x11-xserver-utils in the list, the check names xsetroot and its package."""
    found = problems(listed_packages() - {"x11-xserver-utils"})
    assert any(line.startswith("xsetroot (tests/test_web.py:") for line in found), found
    assert any("comes from x11-xserver-utils, missing from" in line for line in found), found


def test_a_program_not_installed_is_named_with_its_package() -> None:
    """On a fresh machine, where xsetroot is not installed, its package comes from KNOWN."""
    found = problems(listed_packages() - {"x11-xserver-utils"}, absent=frozenset({"xsetroot"}))
    expected = re.compile(r"xsetroot \(.*\) comes from x11-xserver-utils, missing from")
    assert any(expected.match(line) for line in found), found


def test_every_known_program_is_used() -> None:
    """KNOWN names only programs the code still starts, so it stays a true account."""
    seen = {use.name for use in scan()}
    assert not sorted(KNOWN.keys() - seen)


def test_every_listed_package_is_installed() -> None:
    """`make test` installed every package of the list (a typo there would be missed otherwise)."""
    missing = sorted(listed_packages() - installed().depends.keys())
    assert not missing, f"not installed: {missing}; run `make system`"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('run_command(page, "xsetroot -solid red")', {("xsetroot", "shell")}),
        ('send("run_command", cmd="A=1 foo -x 2>&1 | bar && echo $(baz) >&2; exit 3")',
         {("run_command", "word"), ("foo", "shell"), ("bar", "shell"), ("echo", "shell"), ("baz", "shell")}),
        ("""launch("sh -c 'trap \\"\\" TERM; while :; do sleep 1; done'")""",
         {("sh", "shell"), ("sleep", "shell")}),
        ('spawn(jail, ["Xvfb", ":1"])', {("Xvfb", "start")}),
        ('xvfb = ["Xvfb", f":{n}", "-screen", "0"]', {("Xvfb", "shell")}),
        ('argv = ["/bin/sh", "-c", f"mkdir -p {d} && touch x"]',
         {("/bin/sh", "shell"), ("/bin/sh", "start"), ("mkdir", "shell"), ("touch", "shell")}),
        ('await create_subprocess_exec(PY, "-m", "server")', {("server", "word")}),
        ('PYTHON = "/usr/bin/python3"', {("/usr/bin/python3", "start")}),
        ('window_manager = ("openbox",)', {("openbox", "word")}),
        ('def f():\n    """Xvfb runs here."""', set()),
    ],
)  # fmt: skip
def test_scan_finds_programs(source: str, expected: set[tuple[str, Kind]]) -> None:
    """The scan finds programs in process starts, shell lines, argv lists, paths and plain strings."""
    scanner = Scanner("x.py")
    scanner.visit(ast.parse(source))
    assert {(u.name, u.kind) for u in scanner.uses} == expected


def test_playwright_driver_comes_from_the_venv() -> None:
    """Playwright's driver is the Python package's, installed by `pip install -e .[dev]`, not Debian's."""
    from playwright._impl._driver import compute_driver_executable

    program = Path(compute_driver_executable()[0])  # (node, cli.js)
    assert program.is_file() and program.resolve().is_relative_to(Path(sys.prefix).resolve())
    assert re.search(r'"playwright[>=<~ ]', (ROOT / "pyproject.toml").read_text())
