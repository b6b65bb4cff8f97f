"""The listener: one LISTEN connection per process and log, shared by all subscriptions.

It runs in a daemon thread, for sync and async subscriptions alike, so a busy or
blocked event loop never delays draining notifications, and a process that mixes
both styles still opens one LISTEN connection per log.

A notification is only a doorbell: the listener rings every subscription that
follows the notification's channel, and each subscription reads from its own
cursor. The listener keeps no queue of events, so a slow subscription costs it
nothing. After every reconnect it rings all subscriptions, because notifications
sent while it was away are gone for good.

The connection is driven at the libpq level (non-blocking sends, `select` with a
deadline) so that a heartbeat query on a half-open connection times out instead of
hanging the thread.
"""

from __future__ import annotations

import logging
import math
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import psycopg
from psycopg import pq

from ._channels import listen_statement, unlisten_statement
from ._settings import Settings

logger = logging.getLogger(__name__)


class Doorbell(Protocol):
    """What the listener rings; must be cheap, thread-safe and never raise."""

    def ring(self) -> None: ...


class _ConnectionLost(Exception):
    pass


class Listener:
    """Keeps a LISTEN connection alive and rings doorbells on notifications."""

    def __init__(self, conninfo: str, settings: Settings) -> None:
        self._conninfo = conninfo
        self._settings = settings
        self._lock = threading.Lock()
        self._interest: dict[str, set[Doorbell]] = {}
        self._listening: set[str] = set()
        self._waiters: list[tuple[frozenset[str], Callable[[], None]]] = []
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._backend_pid: int | None = None
        self.connections = 0

    # -- public, called from any thread -------------------------------------------

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, while connected."""
        return self._backend_pid

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"eventlog-listener-{self._settings.schema_name}",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("listener thread did not stop within %.1f s", timeout)
        self._thread = None
        self._wake_reader.close()
        self._wake_writer.close()

    def add(
        self, doorbell: Doorbell, channels: Iterable[str], on_ready: Callable[[], None]
    ) -> None:
        """Ring `doorbell` on notifications of `channels`.

        `on_ready` is called, from some thread, once LISTEN is in effect for every
        channel, so that a read made after it cannot miss a later event.
        """
        channels = frozenset(channels)
        with self._lock:
            for channel in channels:
                self._interest.setdefault(channel, set()).add(doorbell)
            ready = self._connected and channels <= self._listening
            if not ready:
                self._waiters.append((channels, on_ready))
        if ready:
            on_ready()
        else:
            self._wake()

    def remove(self, doorbell: Doorbell, channels: Iterable[str]) -> None:
        with self._lock:
            for channel in channels:
                bells = self._interest.get(channel)
                if bells is None:
                    continue
                bells.discard(doorbell)
                if not bells:
                    del self._interest[channel]
        self._wake()

    def ring_all(self) -> None:
        with self._lock:
            bells = {bell for bells in self._interest.values() for bell in bells}
        for bell in bells:
            bell.ring()

    # -- the thread ------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the listener is closed

    def _run(self) -> None:
        delay = self._settings.reconnect_initial_delay
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                pause = random.uniform(0, delay)
                logger.warning(
                    "listener could not connect (%s); retrying in %.2f s", _reason(exc), pause
                )
                self._stopping.wait(pause)
                delay = min(delay * 2, self._settings.reconnect_max_delay)
                continue

            delay = self._settings.reconnect_initial_delay
            try:
                self._serve(conn)
            except _ConnectionLost as exc:
                pause = random.uniform(0, delay)
                logger.warning(
                    "listener connection lost (%s); reconnecting in %.2f s", exc, pause
                )
                self._stopping.wait(pause)
            finally:
                with self._lock:
                    self._connected = False
                    self._listening.clear()
                self._backend_pid = None
                conn.close()
        logger.info("listener stopped")

    def _connect(self) -> psycopg.Connection:
        settings = self._settings
        # Keepalives and tcp_user_timeout make the kernel notice a dead peer on TCP
        # connections; the heartbeat below covers what they cannot see.
        conn = psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, math.ceil(settings.connect_timeout)),
            application_name="eventlog-listener",
            keepalives=1,
            keepalives_idle=max(1, int(settings.heartbeat_interval)),
            keepalives_interval=max(1, int(settings.heartbeat_timeout / 3)),
            keepalives_count=3,
            tcp_user_timeout=int(settings.heartbeat_timeout * 1000),
        )
        self.connections += 1
        return conn

    def _serve(self, conn: psycopg.Connection) -> None:
        pgconn = conn.pgconn
        pgconn.nonblocking = 1
        self._backend_pid = pgconn.backend_pid
        first = self.connections == 1

        self._sync_channels(pgconn)
        with self._lock:
            self._connected = True
        logger.info(
            "listener %s, listening on %d channels (backend pid %d)",
            "connected" if first else "reconnected", len(self._listening), pgconn.backend_pid,
        )
        if not first:
            # Notifications sent while we were away are lost: let every
            # subscription read from its cursor.
            self.ring_all()

        last_traffic = time.monotonic()
        while not self._stopping.is_set():
            self._sync_channels(pgconn)
            idle = time.monotonic() - last_traffic
            if idle >= self._settings.heartbeat_interval:
                self._command(pgconn, b"SELECT 1", "heartbeat")
                last_traffic = time.monotonic()
                continue

            readable, _, _ = select.select(
                [pgconn.socket, self._wake_reader], [], [],
                self._settings.heartbeat_interval - idle,
            )
            if self._wake_reader in readable:
                self._drain_wake()
            if pgconn.socket in readable:
                self._consume(pgconn)
                last_traffic = time.monotonic()

    def _sync_channels(self, pgconn: pq.abc.PGconn) -> None:
        with self._lock:
            wanted = set(self._interest)
            to_listen = wanted - self._listening
            to_unlisten = self._listening - wanted
        if to_listen or to_unlisten:
            statements = [listen_statement(c) for c in sorted(to_listen)]
            statements += [unlisten_statement(c) for c in sorted(to_unlisten)]
            query = "; ".join(s.as_string(None) for s in statements).encode()
            self._command(pgconn, query, "LISTEN")
            logger.debug("listening on %d more and %d fewer channels", len(to_listen), len(to_unlisten))

        with self._lock:
            self._listening |= to_listen
            self._listening -= to_unlisten
            listening = set(self._listening)
            ready = [w for w in self._waiters if w[0] <= listening]
            self._waiters = [w for w in self._waiters if not w[0] <= listening]
        for _, on_ready in ready:
            on_ready()

    def _command(self, pgconn: pq.abc.PGconn, query: bytes, what: str) -> None:
        """Run `query` with a deadline, dispatching notifications that arrive meanwhile."""
        deadline = time.monotonic() + self._settings.heartbeat_timeout
        try:
            pgconn.send_query(query)
            while pgconn.flush() != 0:
                self._wait_socket(pgconn, deadline, what, write=True)
            while True:
                self._consume(pgconn)
                if pgconn.is_busy():
                    self._wait_socket(pgconn, deadline, what)
                    continue
                result = pgconn.get_result()
                if result is None:
                    return
                if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                    message = (result.error_message or b"").decode(errors="replace").strip()
                    raise _ConnectionLost(f"{what} failed: {message}")
        except psycopg.Error as exc:
            raise _ConnectionLost(_reason(exc)) from exc

    def _wait_socket(
        self, pgconn: pq.abc.PGconn, deadline: float, what: str, write: bool = False
    ) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _ConnectionLost(
                f"{what} got no answer within {self._settings.heartbeat_timeout:g} s"
            )
        sockets = [pgconn.socket]
        if write:
            select.select([], sockets, [], remaining)
        else:
            select.select(sockets, [], [], remaining)

    def _consume(self, pgconn: pq.abc.PGconn) -> None:
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise _ConnectionLost(_reason(exc)) from exc
        channels = set()
        while (notify := pgconn.notifies()) is not None:
            channels.add(notify.relname.decode("utf-8", errors="replace"))
        if pgconn.status != pq.ConnStatus.OK:
            raise _ConnectionLost(_reason_from(pgconn))
        if channels:
            self._dispatch(channels)

    def _dispatch(self, channels: set[str]) -> None:
        with self._lock:
            bells = {bell for c in channels for bell in self._interest.get(c, ())}
        for bell in bells:
            bell.ring()

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _reason_from(pgconn: pq.abc.PGconn) -> str:
    text = (pgconn.error_message or b"").decode(errors="replace").strip()
    return text.splitlines()[0] if text else "server closed the connection"


# -- one listener per process and log --------------------------------------------------

_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], tuple[Listener, int]] = {}


def acquire(conninfo: str, settings: Settings) -> Listener:
    """Return the process's listener for this database and schema, starting it if needed."""
    key = (conninfo, settings.schema_name)
    with _registry_lock:
        listener, users = _registry.get(key, (None, 0))
        if listener is None:
            listener = Listener(conninfo, settings)
            listener.start()
        _registry[key] = (listener, users + 1)
        return listener


def release(listener: Listener) -> None:
    """Give back a listener from `acquire`; the last user stops it."""
    with _registry_lock:
        for key, (candidate, users) in list(_registry.items()):
            if candidate is listener:
                if users > 1:
                    _registry[key] = (candidate, users - 1)
                    return
                del _registry[key]
                break
    listener.stop()
