"""Test helpers: an SSE parser written from the WHATWG spec, and an in-loop uvicorn server.

The parser is deliberately independent of eventlog.web's framing code, so that a
framing bug on the server cannot be mirrored by the same bug in the test.
"""

from __future__ import annotations

import asyncio
import codecs
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import uvicorn

WAIT = 20.0  # seconds; generous, for a loaded two-core machine


@dataclass
class Message:
    """One dispatched block: the fields it carried (data None when it had no data line)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def dispatched(self) -> bool:
        """Whether a browser fires an event for it (it has data)."""
        return self.data is not None

    @property
    def type(self) -> str:
        return self.event or "message"


class SSEParser:
    """Feed bytes, collect messages; comment-only blocks come out as comments."""

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._block = Message()
        self._data: list[str] | None = None
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes, final: bool = False) -> list[Message]:
        self._buffer += self._decoder.decode(chunk, final)
        out: list[Message] = []
        while True:
            cut = self._next_line_end(final)
            if cut is None:
                break
            line, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1]:]
            message = self._line(line)
            if message is not None:
                out.append(message)
        return out

    def _next_line_end(self, final: bool) -> tuple[int, int] | None:
        for i, ch in enumerate(self._buffer):
            if ch == "\n":
                return i, i + 1
            if ch == "\r":
                if i + 1 < len(self._buffer):
                    return (i, i + 2) if self._buffer[i + 1] == "\n" else (i, i + 1)
                return (i, i + 1) if final else None  # a CRLF may be split across chunks
        return None

    def _line(self, line: str) -> Message | None:
        if line == "":
            block, self._block = self._block, Message()
            if self._data is not None:
                block.data = "\n".join(self._data)
            self._data = None
            if block.id is None and block.event is None and block.data is None and block.retry is None:
                return block if block.comments else None
            return block
        if line.startswith(":"):
            self._block.comments.append(line[1:].removeprefix(" "))
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data = (self._data or []) + [value]
        elif name == "event":
            self._block.event = value
        elif name == "id" and "\0" not in value:
            self._block.id = value
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._block.retry = int(value)
            self.retry = int(value)
        return None


class SSEStream:
    """A streaming response read message by message, with timeouts."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SSEParser()
        self._chunks = response.aiter_raw()
        self._pending: list[Message] = []
        self.closed = False

    async def next(self, timeout: float = WAIT) -> Message:
        """Return the next block (event, position, retry hint or comment)."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Message:
        while not self._pending:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self.closed = True
                self._pending.extend(self.parser.feed(b"", final=True))
                if not self._pending:
                    raise EOFError("the server ended the stream") from None
                break
            self._pending.extend(self.parser.feed(chunk))
        return self._pending.pop(0)

    async def events(self, count: int, timeout: float = WAIT) -> list[Message]:
        """Return the next `count` dispatched messages, skipping comments and positions."""
        got: list[Message] = []

        async def collect() -> None:
            while len(got) < count:
                message = await self._next()
                if message.dispatched:
                    got.append(message)

        await asyncio.wait_for(collect(), timeout)
        return got


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


class InLoopServer:
    """A uvicorn server on 127.0.0.1, an ephemeral port, in the running event loop."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> InLoopServer:
        # uvicorn installs signal handlers only in the main thread, and restores them.
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await wait_until(lambda: self.server.started or self._task.done(), what="uvicorn to start")
        if self._task.done():
            self._task.result()
        return self

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await asyncio.wait_for(self._task, WAIT)
        self.sock.close()
