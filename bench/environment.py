"""The machine and the server settings that a benchmark result depends on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psycopg

import eventlog

from .common import Table

# Settings that decide commit cost (fsync, WAL) and read cost (memory, planner).
SERVER_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "wal_sync_method",
    "wal_buffers",
    "wal_writer_delay",
    "commit_delay",
    "max_wal_size",
    "checkpoint_timeout",
    "shared_buffers",
    "work_mem",
    "effective_cache_size",
    "random_page_cost",
    "jit",
)


def machine_table() -> Table:
    rows = [
        ["CPU", _cpu_model()],
        ["cores (logical)", str(os.cpu_count())],
        ["RAM", _memory()],
        ["OS", f"{platform.system()} {platform.release()}"],
        ["Python", platform.python_version()],
        ["psycopg", f"{psycopg.__version__} ({psycopg.pq.__impl__} implementation, libpq {_libpq()})"],
        ["eventlog", eventlog.__version__],
    ]
    return Table("Machine", ["", ""], rows)


def server_table(conn: psycopg.Connection) -> Table:
    version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    rows = [["PostgreSQL", version]]
    for name in SERVER_SETTINGS:
        # current_setting() formats sizes and times as SHOW does ("128MB", "5min").
        row = conn.execute("SELECT current_setting(%s, true)", [name]).fetchone()
        if row is not None and row[0] is not None:
            rows.append([name, row[0]])
    return Table("Server settings (read from the server)", ["setting", "value"], rows)


def is_durable(conn: psycopg.Connection) -> bool:
    fsync = conn.execute("SHOW fsync").fetchone()[0]  # type: ignore[index]
    commit = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    return fsync == "on" and commit in ("on", "remote_write", "remote_apply", "local")


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _libpq() -> str:
    version = psycopg.pq.version()
    return f"{version // 10000}.{version % 100}"
