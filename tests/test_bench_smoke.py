"""The benchmark's quick mode runs end to end and writes a well-formed report.

Nothing here looks at the figures: they depend on the machine, and the test
server runs with fsync off.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT = 600  # seconds; the quick mode takes under a minute on an idle machine
HEADINGS = (
    "# Benchmarks",
    "## Summary",
    "## This run",
    "## 1. Publish throughput",
    "## 2. Batch of 1,000 events",
    "## 3. Publish-to-subscriber latency",
    "## 4. Replay of ",
    "## 5. Index check on ",
)


@pytest.fixture(scope="module")
def quick_run(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run `python -m bench --quick` once for the module; return the process and the report path."""
    output = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--database-url", database_url, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    return result, output


def markdown_tables(text: str) -> list[list[str]]:
    """Return each table of `text` as its lines."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def cells(line: str) -> list[str]:
    inner = line.strip()[1:-1].replace("\\|", "\0")
    return [cell.strip() for cell in inner.split("|")]


def test_quick_run_writes_report(quick_run):
    result, output = quick_run

    assert result.returncode == 0, result.stderr[-4000:]
    text = output.read_text(encoding="utf-8")
    for heading in HEADINGS:
        assert any(line.startswith(heading) for line in text.splitlines()), heading

    tables = markdown_tables(text)
    assert len(tables) >= 10
    for table in tables:
        width = len(cells(table[0]))
        assert all(set(cell) <= {"-", " "} for cell in cells(table[1])), table[:2]
        for line in table:
            assert line.endswith("|"), line
            assert len(cells(line)) == width, line

    summary = tables[0]
    assert cells(summary[0])[-1] == "result"
    verdicts = [cells(line)[-1] for line in summary[2:]]
    assert len(verdicts) >= 5
    assert set(verdicts) <= {"pass", "**miss**"}


def test_quick_run_drops_its_database(quick_run, database_url: str):
    result, _ = quick_run

    assert result.returncode == 0, result.stderr[-4000:]
    with psycopg.connect(database_url) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'eventlog_bench_%'").fetchall()
    assert left == []
