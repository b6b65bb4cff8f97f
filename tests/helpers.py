"""Helpers for the delivery and fault tests: waiting, checking, collecting, a TCP proxy.

Import them as ``from helpers import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

import eventlog
from eventlog._listener import Listener

logger = logging.getLogger(__name__)

# Every wait on a condition gets this long by default: far more than any step
# needs on an idle machine, so that a loaded CI machine never fails a test on time.
WAIT = 60.0


def wait_until(condition: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> float:
    """Poll `condition` until it is true; return the seconds it took, fail after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.005)
    return time.monotonic() - started


def stays_true(condition: Callable[[], object], seconds: float) -> bool:
    """Check `condition` for `seconds`; return False as soon as it is false."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.005)
    return True


def wait_reconnected(listener: Listener, old_pid: int | None, timeout: float = WAIT) -> float:
    """Wait until `listener` listens again on a new backend (not `old_pid`)."""
    return wait_until(
        lambda: listener.connected and listener.backend_pid not in (None, old_pid),
        timeout,
        f"listener reconnect (old backend pid {old_pid})",
    )


def delivery_problems(received: Sequence[int], expected: Iterable[int]) -> list[str]:
    """Compare delivered ids with the committed ones; return what is wrong, if anything.

    A correct delivery is exactly the expected ids, ascending, each once.
    """
    expected_set = set(expected)
    problems = []
    counts = collections.Counter(received)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"duplicates {_sample(duplicates)}")
    backwards = [(a, b) for a, b in zip(received, received[1:]) if b <= a]
    if backwards:
        problems.append(f"out of order {_sample(backwards)}")
    missing = sorted(expected_set - counts.keys())
    if missing:
        problems.append(f"missing {len(missing)} {_sample(missing)}")
    unexpected = sorted(counts.keys() - expected_set)
    if unexpected:
        problems.append(f"unexpected {_sample(unexpected)}")
    return problems


def _sample(items: Sequence[object], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def expected_for(events: Iterable[eventlog.Event], topics: Iterable[str]) -> list[int]:
    """Ids of `events` that a subscription to `topics` must deliver."""
    wanted = set(topics)
    return sorted(e.id for e in events if wanted.intersection(e.topics))


class SyncCollector:
    """Iterates a sync subscription in a thread until an event of type `until` arrives.

    With ``keep_events=False`` it keeps only the ids, 8 bytes each, for tests
    that measure memory.
    """

    def __init__(
        self, subscription: eventlog.Subscription, until: str = "end", timeout: float = 120.0,
        keep_events: bool = True,
    ) -> None:
        self.subscription = subscription
        self.until = until
        self.timeout = timeout
        self.keep_events = keep_events
        self.events: list[eventlog.Event] = []
        self.ids: Sequence[int] = [] if keep_events else array.array("q")
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="collector")

    def start(self) -> SyncCollector:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                event = self.subscription.next_event(timeout=max(0.0, deadline - time.monotonic()))
                if event is None:
                    break
                self.ids.append(event.id)  # type: ignore[attr-defined]
                if self.keep_events:
                    self.events.append(event)
                if event.type == self.until:
                    break
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = WAIT) -> list[eventlog.Event]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"collector still running after {timeout:g} s ({len(self.ids)} events)")
        if self.error is not None:
            raise self.error
        return self.events


async def collect_async(
    subscription: eventlog.AsyncSubscription, until: str = "end", timeout: float = 120.0
) -> list[eventlog.Event]:
    """Read an async subscription until an event of type `until` arrives."""
    events: list[eventlog.Event] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        event = await subscription.next_event(timeout=max(0.0, deadline - loop.time()))
        if event is None:
            break
        events.append(event)
        if event.type == until:
            break
    return events


def publish_generated(conn, schema: str, topic: str, type: str, count: int) -> None:
    """Publish `count` events of `topic` through publish_batch_v1 with arrays built by the server.

    The events go through the same lock, insert and NOTIFY as `publish_many`,
    without building them in Python, for tests whose measurements should not
    include the publisher.
    """
    conn.execute(
        f"""SELECT count(*) FROM "{schema}".publish_batch_v1(
                (SELECT jsonb_agg(jsonb_build_array(%(topic)s::text)) FROM generate_series(1, %(count)s)),
                array_fill(%(type)s::text, ARRAY[%(count)s]),
                (SELECT array_agg(jsonb_build_object('n', n)) FROM generate_series(1, %(count)s) AS n),
                array_fill('{{}}'::jsonb, ARRAY[%(count)s]))""",
        {"topic": topic, "type": type, "count": count},
    )


def url_host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def url_with(url: str, *, host: str | None = None, port: int | None = None, user: str | None = None,
             password: str | None = None, dbname: str | None = None) -> str:
    """Return `url` with some of its parts replaced."""
    parts = urllib.parse.urlsplit(url)
    old_user = urllib.parse.unquote(parts.username or "")
    old_password = parts.password
    new_user = old_user if user is None else user
    # A new user does not inherit the old user's password.
    new_password = password
    if password is None and user is None:
        new_password = old_password
    credentials = urllib.parse.quote(new_user, safe="")
    if new_password is not None:
        credentials += ":" + urllib.parse.quote(new_password, safe="")
    netloc = f"{credentials}@{host or parts.hostname}:{port or parts.port or 5432}"
    path = f"/{dbname}" if dbname is not None else parts.path
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path))


class TcpProxy:
    """A TCP proxy on 127.0.0.1 that a test can freeze or cut.

    * ``freeze()`` stops forwarding in both directions but keeps every socket
      open: to both ends the connection looks alive and silent, like a peer
      behind a dead router (a half-open connection).
    * ``cut()`` closes both sides of every open connection.

    One thread accepts; each connection has one thread per direction.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True, name="tcp-proxy")
        self._thread.start()

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        return url_with(url, host="127.0.0.1", port=self.port)

    def freeze(self) -> None:
        self._flowing.clear()

    def unfreeze(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        _close(self._server)
        self.cut()
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._flowing.wait()  # while frozen, a new connection hangs too
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True, name="tcp-proxy-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen: hold the data, keep both sockets open
                if self._closed.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
