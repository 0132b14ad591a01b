"""Workflow files: the shipped ones load, and bad ones are refused with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.workflows import SHIPPED_FOLDER, Step, describe, load_workflow, load_workflows


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_workflows_load() -> None:
    """Every shipped file loads, and the default one is desktop, setup, task."""
    workflows = load_workflows(SHIPPED_FOLDER)
    assert {"default", "browse", "inspect"} <= workflows.keys()
    assert [s.kind for s in workflows["default"].steps] == ["desktop", "setup", "task"]
    assert workflows["default"].needs_query
    assert not workflows["inspect"].needs_query


def test_fields_are_parsed(tmp_path: Path) -> None:
    """Each kind of step keeps its own fields, with defaults for the optional ones."""
    path = write(
        tmp_path,
        "all",
        """
description = "every kind"
[[steps]]
kind = "desktop"
[[steps]]
kind = "setup"
packages = ["jq", "pip:requests==2.32.0"]
[[steps]]
kind = "command"
cmd = "make test"
[[steps]]
kind = "command"
cmd = "sleep 1"
timeout = 5
[[steps]]
kind = "open"
url = "https://example.com/a?b=c"
[[steps]]
kind = "task"
query = "Explain {query} with {{braces}}"
""",
    )
    workflow = load_workflow(path)
    assert workflow.name == "all"
    assert workflow.steps == (
        Step(kind="desktop"),
        Step(kind="setup", packages=("jq", "pip:requests==2.32.0")),
        Step(kind="command", cmd="make test", timeout=600.0),
        Step(kind="command", cmd="sleep 1", timeout=5.0),
        Step(kind="open", url="https://example.com/a?b=c"),
        Step(kind="task", query="Explain {query} with {{braces}}"),
    )
    assert workflow.steps[5].query.format(query="X") == "Explain X with {braces}"


def test_describe_is_plain_data() -> None:
    """describe gives only the fields of each step's kind, as JSON-ready values."""
    data = describe(load_workflows(SHIPPED_FOLDER)["browse"])
    assert data["name"] == "browse"
    assert data["description"]
    assert data["steps"][1] == {"kind": "open", "url": "https://duckduckgo.com/"}
    assert data["steps"][0] == {"kind": "desktop"}


BAD_FILES = [
    ("not toml", "cannot read it as TOML"),
    ('steps = [{kind = "desktop"}]', "'description' must be a non-empty string"),
    ('description = "d"', "'steps' must be a non-empty list"),
    ('description = "d"\nsteps = []', "'steps' must be a non-empty list"),
    ('description = "d"\nname = "x"\nsteps = [{kind = "desktop"}]', "unknown field 'name'"),
    ('description = "d"\nsteps = ["desktop"]', "step 1: must be a table"),
    ('description = "d"\nsteps = [{kind = "dance"}]', "step 1: 'kind' must be one of"),
    (
        'description = "d"\nsteps = [{kind = "desktop"}, {kind = "command"}]',
        "step 2 (command): missing 'cmd'",
    ),
    ('description = "d"\nsteps = [{kind = "command", cmd = ""}]', "'cmd' must be a non-empty string"),
    (
        'description = "d"\nsteps = [{kind = "command", cmd = "ls", timout = 3}]',
        "step 1 (command): unknown field 'timout'",
    ),
    ('description = "d"\nsteps = [{kind = "command", cmd = "ls", timeout = 0}]', "'timeout' must be"),
    ('description = "d"\nsteps = [{kind = "command", cmd = "ls", timeout = true}]', "'timeout' must be"),
    ('description = "d"\nsteps = [{kind = "command", cmd = "ls", timeout = nan}]', "'timeout' must be"),
    ('description = "d"\nsteps = [{kind = "setup", packages = "jq"}]', "'packages' must be a list"),
    ('description = "d"\nsteps = [{kind = "setup", packages = ["jq; rm -rf /"]}]', "is not a package name"),
    ('description = "d"\nsteps = [{kind = "open", url = "file:///etc/passwd"}]', "http or https URL"),
    ('description = "d"\nsteps = [{kind = "open", url = "https://"}]', "http or https URL"),
    ('description = "d"\nsteps = [{kind = "task", query = "{user}"}]', "only use the placeholder {query}"),
    ('description = "d"\nsteps = [{kind = "task", query = "{query!r}"}]', "only use the placeholder"),
    ('description = "d"\nsteps = [{kind = "task", query = "a { b"}]', "unbalanced braces"),
    ('description = "d"\nsteps = [{kind = "desktop", url = "https://x"}]', "(desktop): unknown field 'url'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_files_name_file_step_and_problem(tmp_path: Path, text: str, message: str) -> None:
    """A bad file raises ValueError naming the file, the step and what is wrong."""
    path = write(tmp_path, "bad", text)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        load_workflows(tmp_path)
    assert str(caught.value).startswith(f"{path}: ")


def test_bad_file_name_is_refused(tmp_path: Path) -> None:
    """A file whose name cannot be a workflow name is an error, not silently skipped."""
    write(tmp_path, "no spaces", 'description = "d"\nsteps = [{kind = "desktop"}]')
    with pytest.raises(ValueError, match="file name must match"):
        load_workflows(tmp_path)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    """Pointing at a folder that does not exist is reported, not read as no workflows."""
    with pytest.raises(ValueError, match="not a folder of workflows"):
        load_workflows(tmp_path / "nope")


def test_empty_folder_has_no_workflows(tmp_path: Path) -> None:
    """An empty folder is simply no workflows."""
    assert load_workflows(tmp_path) == {}
