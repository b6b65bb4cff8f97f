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
hanging the thread. The heartbeat is sent every `heartbeat_interval` even while
notifications flow: incoming traffic proves the server is alive, but only a query
from us resets the server's `idle_session_timeout`.

When the server ends the session (pg_terminate_backend, shutdown,
idle_session_timeout), it usually sends the reason in a FATAL message first. The
listener keeps that text and logs it with the reconnect, in place of libpq's
generic "server closed the connection unexpectedly".
"""

from __future__ import annotations

import logging
import math
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import psycopg
import psycopg.errors
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
        # Channels for which LISTEN is in effect on the current connection. A
        # channel leaves this set before its UNLISTEN is sent, and enters it only
        # after its LISTEN succeeded, so `add` never reports a channel as ready
        # while it is not listened to.
        self._listening: set[str] = set()
        self._waiters: list[tuple[frozenset[str], Callable[[], None]]] = []
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._backend_pid: int | None = None
        self._server_reason: str | None = None
        self.connections = 0

    # -- public, called from any thread -------------------------------------------

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, while connected."""
        return self._backend_pid

    @property
    def connected(self) -> bool:
        """True while a connection is up and LISTEN is in effect for its channels."""
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
                # Leave the wake-up sockets open: the thread still selects on them.
                logger.warning("listener thread did not stop within %.1f s", timeout)
                return
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

            reason = None
            healthy = False
            try:
                self._serve(conn)
            except _ConnectionLost as exc:
                reason = str(exc)
                healthy = self._connected
            except Exception as exc:
                # Never let the thread die: without it every subscription would
                # silently fall back to polling.
                logger.exception("listener failed unexpectedly; reconnecting")
                reason = f"unexpected {type(exc).__name__}: {exc}"
            finally:
                self._disconnected(conn)
            if reason is None:
                break  # stopping

            # A connection that got as far as listening resets the backoff. One that
            # the server ends at once (recovery, rejected role), or a bug of ours,
            # keeps it growing.
            if healthy:
                delay = self._settings.reconnect_initial_delay
            else:
                delay = min(delay * 2, self._settings.reconnect_max_delay)
            pause = random.uniform(0, delay)
            logger.warning("listener connection lost (%s); reconnecting in %.2f s", reason, pause)
            self._stopping.wait(pause)
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
        # A server that ends an idle session sends its reason as an unsolicited
        # FATAL message, which libpq hands to the notice handler.
        self._server_reason = None
        conn.add_notice_handler(self._on_notice)
        self.connections += 1
        return conn

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("FATAL", "PANIC"):
            self._server_reason = _describe(diag.message_primary, diag.sqlstate)

    def _disconnected(self, conn: psycopg.Connection) -> None:
        # Forget the connection before the backoff pause, so that `add` waits for
        # the next LISTEN instead of trusting the dead one.
        with self._lock:
            self._connected = False
            self._listening.clear()
        self._backend_pid = None
        conn.close()

    def _serve(self, conn: psycopg.Connection) -> None:
        pgconn = conn.pgconn
        pgconn.nonblocking = 1
        self._backend_pid = pgconn.backend_pid

        self._sync_channels(pgconn)
        with self._lock:
            self._connected = True
            listening = len(self._listening)
        logger.info(
            "listener %s, listening on %d channel(s) (backend pid %d)",
            "connected" if self.connections == 1 else "reconnected", listening, pgconn.backend_pid,
        )
        # Notifications sent while no LISTEN was in effect are lost (before the
        # first connect too, if a subscription stopped waiting for it): let every
        # subscription read from its cursor.
        self.ring_all()

        # Heartbeat on a fixed schedule, not after a quiet spell: notifications
        # arriving prove the server is alive, but only our query keeps the
        # server's idle_session_timeout from ending the session.
        next_heartbeat = time.monotonic() + self._settings.heartbeat_interval
        while not self._stopping.is_set():
            self._sync_channels(pgconn)
            now = time.monotonic()
            if now >= next_heartbeat:
                self._command(pgconn, b"SELECT 1", "heartbeat")
                next_heartbeat = time.monotonic() + self._settings.heartbeat_interval
                continue

            readable = _wait_ready([pgconn.socket, self._wake_reader], next_heartbeat - now)
            if self._wake_reader in readable:
                self._drain_wake()
            if pgconn.socket in readable:
                self._consume(pgconn)

    def _sync_channels(self, pgconn: pq.abc.PGconn) -> None:
        with self._lock:
            wanted = set(self._interest)
            to_listen = wanted - self._listening
            to_unlisten = self._listening - wanted
            self._listening -= to_unlisten
        if to_listen or to_unlisten:
            statements = [listen_statement(c) for c in sorted(to_listen)]
            statements += [unlisten_statement(c) for c in sorted(to_unlisten)]
            query = "; ".join(s.as_string(None) for s in statements).encode()
            self._command(pgconn, query, "LISTEN")
            logger.debug(
                "listening on %d more and %d fewer channels", len(to_listen), len(to_unlisten)
            )

        with self._lock:
            self._listening |= to_listen
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
                    raise _ConnectionLost(f"{what} failed: {_result_reason(result)}")
        except psycopg.Error as exc:
            raise _ConnectionLost(self._lost_reason(pgconn, exc)) from exc

    def _wait_socket(
        self, pgconn: pq.abc.PGconn, deadline: float, what: str, write: bool = False
    ) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _ConnectionLost(
                f"{what} got no answer within {self._settings.heartbeat_timeout:g} s"
            )
        _wait_ready([pgconn.socket], remaining, write=write)

    def _consume(self, pgconn: pq.abc.PGconn) -> None:
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise _ConnectionLost(self._lost_reason(pgconn, exc)) from exc
        channels = set()
        while (notify := pgconn.notifies()) is not None:
            channels.add(notify.relname.decode("utf-8", errors="replace"))
        if channels:
            self._dispatch(channels)
        if pgconn.status != pq.ConnStatus.OK:
            raise _ConnectionLost(self._lost_reason(pgconn, None))

    def _lost_reason(self, pgconn: pq.abc.PGconn, exc: BaseException | None) -> str:
        if self._server_reason is not None:
            return f"server ended the session: {self._server_reason}"
        if exc is not None:
            return _reason(exc)
        text = (pgconn.error_message or b"").decode(errors="replace").strip()
        return text.splitlines()[0] if text else "server closed the connection"

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


def _wait_ready(files: list, timeout: float, write: bool = False) -> set:
    """Return those of `files` that are ready to read (or write) within `timeout` seconds.

    Not select.select(): it rejects descriptors above 1023, and a web server with
    a thousand open streams hands the listener's reconnect a descriptor above it.
    """
    event = selectors.EVENT_WRITE if write else selectors.EVENT_READ
    with selectors.DefaultSelector() as selector:
        for file in files:
            selector.register(file, event)
        return {key.fileobj for key, _ in selector.select(timeout)}


def _reason(exc: BaseException) -> str:
    # libpq's messages run over several lines ("server closed the connection
    # unexpectedly / This probably means ..."), and the first one is the cause.
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    first = text.splitlines()[0].strip()
    return first.removeprefix("consuming input failed: ")


def _describe(message: str | None, sqlstate: str | None) -> str:
    text = (message or "no message").strip()
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text


def _result_reason(result: pq.abc.PGresult) -> str:
    primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    if primary is None:
        return (result.error_message or b"").decode(errors="replace").strip() or "no message"
    return _describe(primary.decode(errors="replace"), sqlstate.decode() if sqlstate else None)


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
