"""Shared test helpers (import them with ``from conftest import ...``)."""

from __future__ import annotations

from click.testing import CliRunner, Result

from repsim.cli import cli


def run_cli(*args: str) -> Result:
    """Invoke the ``repsim`` CLI in-process; exceptions other than exit codes propagate."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, pattern: str) -> None:
    """Exit code 2, exactly one non-empty line ``error: ...`` containing ``pattern``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and pattern.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
