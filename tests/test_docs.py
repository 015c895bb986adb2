"""Every command has help text with examples and is covered by the README tour."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moescope.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(c.name or "" for c in app.registered_commands)


def test_all_commands_registered() -> None:
    assert set(COMMANDS) >= {"params", "download", "trace", "report", "merge", "similarity", "prune", "eval"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0
    assert "Examples" in result.stdout
    assert f"moescope {command}" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_tours_every_command(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"### `moescope {command}" in readme, f"README tour lacks a section for {command}"


def test_changelog_has_unreleased() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text and "### Added" in text
