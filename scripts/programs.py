"""Which external programs the product and the tests start, and whether the set-up installs their packages.

A fresh machine has only its base image; ``make test`` installs the Debian
packages listed in ``scripts/install-system-packages.sh`` and nothing else, so
a program whose package is missing from that list fails there and nowhere
else. This module finds the programs in the source and maps each to its
Debian package with ``dpkg -S``. It reads, by strength:

- ``start``: argv[0] of process starts (``create_subprocess_exec``,
  ``Popen``, the sandbox's ``spawn``, ``shutil.which``...), absolute paths
  under ``/usr``, ``/bin`` and ``/sbin`` in any string, and ``REQUIRED``
  (what a scan cannot see: programs our programs start, files they need).
  These must exist, from a Debian package.
- ``shell``: the program of every command of a shell line (strings given to
  ``run``, ``run_command``, ``launch``, ``cmd=``, the script after ``-c``)
  and the head of every argv-shaped list (``["x11vnc", "-display", ...]``).
- ``word``: the first word of any other string (``("openbox",)``), when it
  names an installed program whose package the set-up would not install;
  words that are no program go to ``NOT_PROGRAMS``.

Every program found that is not in every Debian system (Essential, or
priority required as in debootstrap's minbase) must be in ``KNOWN`` with its
package, and that package in the list or pulled in by a listed one
(``--no-install-recommends`` installs Depends and Pre-Depends, the first of
alternatives). ``KNOWN`` is what makes the check work on a fresh machine too,
where a program of a missing package cannot be found to ask ``dpkg -S``.

Programs of the virtualenv are not Debian's: Python itself and Playwright's
driver come with the packages of ``pyproject.toml``; the scan skips
``sys.executable``, and ``test_playwright_driver_comes_from_the_venv``
checks the driver (the browser it drives is Debian's ``/usr/bin/chromium``,
scanned like any path). The Makefile, CI and install script are not
scanned: they run before the packages are there.

``tests/test_programs.py`` runs the check in ``make test``;
``python scripts/programs.py`` prints what it finds.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import gc
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "scripts" / "install-system-packages.sh"
#: Folders that hold no source of ours.
SKIP_DIRS = frozenset({".venv", ".git", "var", "artifacts", "build", "dist", "node_modules", "__pycache__"})
#: Only Debian's folders: a program found elsewhere (pyenv, /usr/local) is not a package's.
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: Sources whose strings are no program of this machine (globs): E2B's
#: commands run in E2B's sandboxes, and this module names programs as data.
NOT_SCANNED = ("sandboxes/e2b*.py", "tests/*e2b*.py", "tests/test_programs.py", "scripts/programs.py")
#: Calls whose first argument is a program or an argv (``spawn``: the second, after the jail).
EXEC_CALLS = frozenset({
    "create_subprocess_exec", "Popen", "check_output", "check_call", "posix_spawnp", "posix_spawn",
    "execvp", "execv", "which",
})  # fmt: skip
#: The local sandbox's own helpers (methods, so ``self._tool``), taking an argv.
EXEC_METHODS = frozenset({"_tool", "_launch"})
#: Calls whose string arguments are shell lines (a session's commands, launched apps).
SHELL_CALLS = frozenset({"run", "run_command", "launch", "create_subprocess_shell", "system"})
SHELL_KEYWORDS = frozenset({"cmd", "app", "script"})
#: Shell words after which a command starts.
SHELL_PREFIXES = frozenset({
    "if", "then", "else", "elif", "do", "while", "until", "!", "{", "time", "exec", "command",
})  # fmt: skip
#: Shell builtins and closing words: no program.
SHELL_BUILTINS = frozenset({
    "fi", "done", "esac", "}", "case", "for", "in", "function", "[[", "]]", "cd", "exit", "export",
    "trap", "set", "unset", "read", "return", "shift", "source", ".", ":", "eval", "wait", "local",
    "break", "continue", "ulimit", "umask", "alias", "type", "builtin", "declare", "kill",
})  # fmt: skip
SHELLS = frozenset({"sh", "bash", "dash", "/bin/sh", "/bin/bash", "/usr/bin/bash"})
#: Words a scan takes for programs that are none here: (word, what it is).
NOT_PROGRAMS = {
    "as": "RLIMIT_AS's name for prlimit",
    "file": "a word of an option's help",
    "g++": "a package name in a test of the package grammar",
    "size": "a test parameter's name",
    "jq": "a package name in a workflow test (fake sandbox)",
    "look": "a word of a test's agent script",
    "make": "a word of a workflow step's text",
    "pip": "the name of a package manager",
    "red": "a colour in a test",
    "time": "a field of a log event",
    "view": "a share mode",
    "vim": "a folder of /etc mounted into jails",
    "write": "a desktop action's name",
    "/lib64": "a link a jail makes",
}
#: Every program (or file) the source names that is not in every Debian
#: system, and its package: on a fresh machine, before its package is
#: installed, this is how the check knows which package a program needs.
KNOWN: dict[str, str] = {
    "Xvfb": "xvfb",
    "x11vnc": "x11vnc",
    "xdotool": "xdotool",
    "import": "imagemagick-6.q16",
    "openbox": "openbox",
    "xterm": "xterm",
    "xdpyinfo": "x11-utils",
    "chromium": "chromium",
    "/usr/bin/chromium": "chromium",
    "bwrap": "bubblewrap",
    "/usr/bin/bwrap": "bubblewrap",
    "python3": "python3-minimal",
    "/usr/bin/python3": "python3-minimal",
    "ps": "procps",
    "slirp4netns": "slirp4netns",
    "/usr/bin/slirp4netns": "slirp4netns",
    "xsetroot": "x11-xserver-utils",
    "xkbcomp": "x11-xkb-utils",
    "/usr/share/novnc": "novnc",
    "/usr/lib/python3/dist-packages/pip/__init__.py": "python3-pip",
    "/etc/X11/fonts/misc/xfonts-base.alias": "xfonts-base",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf": "fonts-dejavu-core",
}
#: Started by our programs, or used through Debian's python3: (program or path, who needs it).
REQUIRED = (
    ("xkbcomp", "Xvfb compiles its keyboard map with it at start"),
    ("/usr/lib/python3/dist-packages/pip/__init__.py", "setup's pip: packages run Debian's `python3 -m pip`"),
    ("/etc/X11/fonts/misc/xfonts-base.alias", "Xvfb cannot start without the core 'fixed' font"),
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "the browser and xterm draw text with it"),
)
#: Stands for an f-string's value.
PLACEHOLDER = "__value__"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*|/[\w./+-]*\w")
PATH_IN_TEXT = re.compile(r"(?<![\w.-])/(?:usr|bin|sbin)/(?!local/)[\w./+-]*\w")
#: Characters of shell operators; an operator with < or > is a redirection.
OPERATORS = ";&|()<>"


Kind = Literal["start", "shell", "word"]
STRENGTH: dict[Kind, int] = {"start": 2, "shell": 1, "word": 0}


@attrs.frozen
class Use:
    """One program (or system file) the source names, and where."""

    name: str
    where: str
    #: ``start``: a process start, an argv or a system path, so it must exist;
    #: ``shell``: a command of a shell line; ``word``: a string's first word.
    kind: Kind


# ----------------------------------------------------------------------------
# The scan


def sources() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        skipped = set(rel.parts) & SKIP_DIRS or any(p.endswith(".egg-info") for p in rel.parts)
        if not skipped and not any(fnmatch.fnmatch(str(rel), glob) for glob in NOT_SCANNED):
            yield path


def shell_programs(line: str) -> Iterator[str]:
    """The program of every command in a shell line, as a shell would split it (nested ``sh -c`` too)."""
    lexer = shlex.shlex(line.replace("\n", ";"), posix=True, punctuation_chars=OPERATORS)
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a shell line
        return
    start, program = True, ""
    for i, token in enumerate(tokens):
        if token and set(token) <= set(OPERATORS):
            start = not ("<" in token or ">" in token)  # a redirection's target is no command
            continue
        if i and tokens[i - 1] == "-c" and program in SHELLS:
            yield from shell_programs(token)
        if not start:
            continue
        if token in SHELL_PREFIXES or re.fullmatch(r"\w+=.*", token):
            continue
        start, program = False, token
        if token not in SHELL_BUILTINS and PLACEHOLDER not in token and NAME.fullmatch(token):
            yield token


def _text(node: ast.expr) -> str | None:
    """A string literal's text, an f-string's with a placeholder for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) or PLACEHOLDER for v in node.values)
    return None


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class Scanner(ast.NodeVisitor):
    """Collects the uses of one module; a string read in a strong place is not read again."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.uses: list[Use] = []
        self.done: set[int] = set()

    def add(self, node: ast.expr, name: str, kind: Kind) -> None:
        self.uses.append(Use(name, f"{self.rel}:{node.lineno}", kind))

    def shell(self, node: ast.expr, *, started: bool = False) -> None:
        """A shell line; its first program is a start when the line is a process's argv[0]."""
        text = _text(node)
        if text is None or id(node) in self.done:
            return
        self.done.add(id(node))
        for n, word in enumerate(shell_programs(text)):
            self.add(node, word, "start" if started and n == 0 else "shell")
        self.paths(node, text)

    def paths(self, node: ast.expr, text: str) -> None:
        for path in PATH_IN_TEXT.findall(text):
            if PLACEHOLDER not in path:
                self.add(node, path, "start")

    def argv(self, node: ast.expr) -> None:
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            node = node.elts[0]
        self.shell(node, started=True)

    def visit_Call(self, node: ast.Call) -> None:
        name = _callee(node)
        method = isinstance(node.func, ast.Attribute) and name in EXEC_METHODS
        if (name in EXEC_CALLS or method) and node.args:
            self.argv(node.args[0])
        if name == "spawn" and len(node.args) > 1:
            self.argv(node.args[1])
        if name in SHELL_CALLS:
            for arg in node.args:
                self.shell(arg)
        for kw in node.keywords:
            if kw.arg in SHELL_KEYWORDS:
                self.shell(kw.value)
        self.generic_visit(node)

    def visit_List(self, node: ast.List | ast.Tuple) -> None:
        texts = [_text(e) for e in node.elts]
        # An argv literal: a program, then an option (["x11vnc", "-display", ...]).
        head = texts[0] if texts else None
        if head and NAME.fullmatch(head) and any(t and t.startswith("-") for t in texts[1:]):
            self.shell(node.elts[0])  # or a command line's arguments: ["serve", "--port", "0"]
        for i, text in enumerate(texts[:-1]):
            if text == "-c":
                self.shell(node.elts[i + 1])
        self.generic_visit(node)

    visit_Tuple = visit_List

    def visit_Expr(self, node: ast.Expr) -> None:
        if _text(node.value) is None:  # a docstring speaks of programs, it starts none
            self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self.plain(node)
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                self.visit(value.value)

    def visit_Constant(self, node: ast.Constant) -> None:
        self.plain(node)

    def plain(self, node: ast.expr) -> None:
        """Any other string: its first word, if it names a program, and the system paths in it."""
        text = _text(node)
        if text is None or id(node) in self.done:
            return
        self.done.add(id(node))
        words = text.split(maxsplit=1)
        word = words[0] if words else ""
        if NAME.fullmatch(word) and not word.startswith("/") and PLACEHOLDER not in word:
            self.add(node, word, "word")
        self.paths(node, text)


def parse(text: str, filename: str) -> ast.Module:
    """``ast.parse`` with no collection during it.

    A finalizer run by a collection inside ``ast.parse`` may parse too (on
    3.11 a logged traceback does, for its carets), and that corrupts the
    parse under way: "AST constructor recursion depth mismatch", CPython
    gh-106905. Test runs with asyncio's debug mode log such tracebacks.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text, filename)
    finally:
        if enabled:
            gc.enable()


def scan() -> list[Use]:
    uses: list[Use] = []
    for path in sources():
        scanner = Scanner(str(path.relative_to(ROOT)))
        scanner.visit(parse(path.read_text(), str(path)))
        uses += scanner.uses
    uses += [Use(name, f"REQUIRED in scripts/programs.py: {why}", "start") for name, why in REQUIRED]
    return uses


# ----------------------------------------------------------------------------
# Debian's view


def listed_packages() -> set[str]:
    match = re.search(r'^PACKAGES="([^"]*)"', INSTALL_SCRIPT.read_text(), re.MULTILINE)
    assert match, f'no PACKAGES="..." line in {INSTALL_SCRIPT}'
    return set(match.group(1).split())


@attrs.frozen
class Installed:
    """The packages dpkg has installed: which are in every Debian system, and what each depends on."""

    base: frozenset[str]
    depends: dict[str, list[list[str]]]
    providers: dict[str, set[str]]

    def closure(self, roots: set[str]) -> set[str]:
        """*roots* and every package they pull in, as apt installs them without recommends."""
        seen: set[str] = set()
        todo = [r for r in roots if r in self.depends]
        while todo:
            pkg = todo.pop()
            if pkg in seen:
                continue
            seen.add(pkg)
            for alternatives in self.depends[pkg]:
                # apt takes the first alternative; only one already there would do instead.
                first = alternatives[0]
                todo += [p for p in {first} | self.providers.get(first, set()) if p in self.depends]
        return seen


def _dependencies(field: str) -> list[list[str]]:
    groups = []
    for group in filter(None, (g.strip() for g in field.split(","))):
        groups.append([re.split(r"[\s(:]", alt.strip(), maxsplit=1)[0] for alt in group.split("|")])
    return groups


@functools.cache
def installed() -> Installed:
    fields = ("Package", "db:Status-Abbrev", "Essential", "Priority", "Pre-Depends}, ${Depends", "Provides")
    fmt = "\t".join(f"${{{f}}}" for f in fields) + "\n"
    out = subprocess.run(["dpkg-query", "-W", f"-f={fmt}"], capture_output=True, text=True, check=True).stdout
    base: set[str] = set()
    depends: dict[str, list[list[str]]] = {}
    providers: dict[str, set[str]] = {}
    for row in out.splitlines():
        pkg, status, essential, priority, deps, provides = row.split("\t")
        if not status.startswith("ii"):
            continue
        depends[pkg] = _dependencies(deps)
        if essential == "yes" or priority == "required":
            base.add(pkg)
        for virtual in _dependencies(provides):
            providers.setdefault(virtual[0], set()).add(pkg)
    return Installed(frozenset(base), depends, providers)


def owners(paths: set[str]) -> dict[str, set[str]]:
    """``dpkg -S`` of every path at once (merged /usr: each also under its other name)."""
    asked = {p: {p, os.path.realpath(p), *_merged_twins(p)} for p in paths}
    every = sorted(set().union(*asked.values())) if asked else []
    out = subprocess.run(["dpkg", "-S", *every], capture_output=True, text=True, check=False).stdout
    owned: dict[str, set[str]] = {}
    for row in out.splitlines():
        if row.startswith("diversion by"):
            continue
        pkgs, _, path = row.partition(": ")
        owned.setdefault(path, set()).update(p.strip().split(":")[0] for p in pkgs.split(","))
    return {p: set().union(*(owned.get(a, set()) for a in also)) for p, also in asked.items()}


def _merged_twins(path: str) -> list[str]:
    for a, b in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/"), ("/usr/lib/", "/lib/")):
        if path.startswith(a):
            return [b + path.removeprefix(a)]
        if path.startswith(b):
            return [a + path.removeprefix(b)]
    return []


def locate(name: str) -> str | None:
    """Where a program (or a system path) is on this machine, in Debian's folders only."""
    if name.startswith("/"):
        return name if os.path.lexists(name) else None
    return shutil.which(name, path=DEBIAN_PATH)


# ----------------------------------------------------------------------------
# The check


def problems(listed: set[str], absent: frozenset[str] = frozenset()) -> list[str]:
    """One line per program (or file) whose package the set-up would not install.

    Names in *absent* are taken as not installed, as on a fresh machine.
    """
    inst = installed()
    provided = inst.closure(listed) | inst.base
    uses: dict[str, list[Use]] = {}
    for use in scan():
        if use.name not in NOT_PROGRAMS:
            uses.setdefault(use.name, []).append(use)
    located = {name: None if name in absent else locate(name) for name in uses}
    owned = owners({p for p in located.values() if p})
    found = []
    for name, seen in sorted(uses.items()):
        use = max(seen, key=lambda u: STRENGTH[u.kind])
        path = located[name]
        pkgs = owned[path] if path else set()
        if pkgs & inst.base:
            continue  # in every Debian system
        if name in KNOWN:
            package = KNOWN[name]
            if pkgs and package not in pkgs:
                found.append(f"{name} ({use.where}) comes from {' or '.join(pkgs)}, not {package} (KNOWN)")
            elif package not in provided | listed:
                found.append(f"{name} ({use.where}) comes from {package}, missing from {INSTALL_SCRIPT.name}")
        elif use.kind == "start" and not pkgs:
            why = "is not installed" if path is None else f"is {path}, which no Debian package owns"
            found.append(f"{name} ({use.where}) {why}: add it and its package to KNOWN and the list")
        elif pkgs and (use.kind != "word" or not pkgs & provided):
            # A word that starts no program belongs in NOT_PROGRAMS instead.
            found.append(f"{name} ({use.where}) comes from {' or '.join(sorted(pkgs))}: add it to KNOWN")
    return found


def main() -> int:
    found = problems(listed_packages())
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
