"""The SSE endpoint, served by a real uvicorn on 127.0.0.1 and read with httpx."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette", reason="eventlog.web needs the 'web' extra (starlette)")
httpx = pytest.importorskip("httpx", reason="the web tests need httpx")
pytest.importorskip("uvicorn", reason="the web tests need uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.routing import Route  # noqa: E402

from _sse import WAIT, InLoopServer, SSEParser, SSEStream, wait_until  # noqa: E402
from eventlog.web import EventStream, format_comment, format_message, parse_last_event_id  # noqa: E402

CART_42 = "shop:cart:user:42"
CART_7 = "shop:cart:user:7"
PRODUCTS = "shop:products"


def shopper_42(request, topics):
    """User 42 may follow its own cart and the product list."""
    return all(t in (CART_42, PRODUCTS) for t in topics)


@pytest.fixture
async def serve():
    started: list[InLoopServer] = []

    async def start(app) -> str:
        server = await InLoopServer(app).start()
        started.append(server)
        return server.url

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as opened:
        yield opened


@pytest.fixture
async def stream_app(alog, serve):
    stream = EventStream(alog, authorize=shopper_42, heartbeat=30.0)
    url = await serve(Starlette(routes=[Route("/events", stream)]))
    return stream, url + "/events"


class Connection:
    def __init__(self, client, url, params=None, headers=None):
        self._cm = client.stream("GET", url, params=params, headers=headers)

    async def __aenter__(self) -> SSEStream:
        response = await self._cm.__aenter__()
        assert response.status_code == 200, (await response.aread()).decode()
        return SSEStream(response)

    async def __aexit__(self, *exc):
        await self._cm.__aexit__(*exc)


# -- framing, without a server --------------------------------------------------------


def parse(raw: bytes):
    return SSEParser().feed(raw, final=True)


def test_format_multiline_data():
    text = "one\ntwo\r\nthree\rfour\n"
    [message] = parse(format_message(data=text, event="note", id=5))
    assert (message.id, message.event) == ("5", "note")
    # SSE joins data lines with LF, so every kind of line break comes back as LF.
    assert message.data == "one\ntwo\nthree\nfour\n"


def test_format_keeps_leading_space():
    [message] = parse(format_message(data="  indented", event=" spaced"))
    assert message.data == "  indented"
    assert message.event == " spaced"


def test_format_rejects_event_with_line_break():
    with pytest.raises(ValueError, match="line break"):
        format_message(data="x", event="a\nb")


def test_format_comment_cannot_break_out():
    [message] = parse(format_comment("ok\nid: 99\ndata: forged"))
    assert message.comments == ["ok", "id: 99", "data: forged"]
    assert message.id is None
    assert message.data is None


def test_parse_last_event_id():
    assert parse_last_event_id("17", "header") == 17
    assert parse_last_event_id(" 0 ", "header") == 0
    assert parse_last_event_id("", "header") is None
    assert parse_last_event_id(None, "header") is None
    for bad in ("abc", "-1", "1.5", "1e3", "0x10", "9" * 20, "²"):
        with pytest.raises(ValueError, match="invalid header"):
            parse_last_event_id(bad, "header")


def test_authorize_required(alog):
    with pytest.raises(TypeError):
        EventStream(alog)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="invalid authorize"):
        EventStream(alog, authorize=None)  # type: ignore[arg-type]


# -- streams --------------------------------------------------------------------------


async def test_stream_framing(alog, stream_app, client):
    stream, url = stream_app
    first = await alog.publish([CART_42], "item_added", {"sku": "tea", "price": "4.50"})
    second = await alog.publish([PRODUCTS], "product_updated", {"id": 3})
    await alog.publish([CART_7], "item_added", {"sku": "not yours"})

    async with client.stream("GET", url, params={"topic": [CART_42, PRODUCTS], "last_event_id": 0}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert "no-cache" in response.headers["cache-control"]
        sse = SSEStream(response)
        hint = await sse.next()
        assert hint.retry == 2000
        assert hint.id is None
        assert not hint.dispatched
        messages = await sse.events(2)

    assert [m.id for m in messages] == [str(first.id), str(second.id)]
    assert [m.event for m in messages] == ["item_added", "product_updated"]
    assert json.loads(messages[0].data) == first.to_json_dict()
    assert json.loads(messages[1].data)["data"] == {"id": 3}


async def test_live_delivery(alog, stream_app, client):
    stream, url = stream_app
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        await sse.next()  # retry hint
        await wait_until(lambda: alog.listener is not None and alog.listener.connected, what="listener")
        published = await alog.publish(CART_42, "item_added", {"n": 1})
        [message] = await sse.events(1)
    assert message.id == str(published.id)


async def test_first_connection_gets_position(alog, stream_app, client):
    stream, url = stream_app
    before = await alog.publish(CART_42, "item_added", {"n": 0})
    async with Connection(client, url, {"topic": CART_42}) as sse:
        hint = await sse.next()
        position = await sse.next()
        # Without a position the stream starts at the head and sends that position,
        # so that a reconnect resumes from there even if no event came in between.
        assert position.id == str(before.id)
        assert not position.dispatched
        later = await alog.publish(CART_42, "item_added", {"n": 1})
        [message] = await sse.events(1)
    assert hint.retry == 2000
    assert message.id == str(later.id)


async def test_resume_from_header(alog, stream_app, client):
    stream, url = stream_app
    events = [await alog.publish(CART_42, "item_added", {"n": n}) for n in range(4)]
    headers = {"Last-Event-ID": str(events[1].id)}
    async with Connection(client, url, {"topic": CART_42}, headers) as sse:
        messages = await sse.events(2)
    assert [m.id for m in messages] == [str(e.id) for e in events[2:]]
    assert sse.parser.last_event_id == str(events[3].id)


async def test_resume_from_query(alog, stream_app, client):
    stream, url = stream_app
    events = [await alog.publish(CART_42, "item_added", {"n": n}) for n in range(3)]
    async with Connection(client, url, {"topic": CART_42, "last_event_id": events[0].id}) as sse:
        messages = await sse.events(2)
    assert [m.id for m in messages] == [str(e.id) for e in events[1:]]


async def test_header_wins_over_query(alog, stream_app, client):
    """EventSource reconnects to the same URL, old query included, with the newer id in the header."""
    stream, url = stream_app
    events = [await alog.publish(CART_42, "item_added", {"n": n}) for n in range(3)]
    params = {"topic": CART_42, "last_event_id": 0}
    headers = {"Last-Event-ID": str(events[1].id)}
    async with Connection(client, url, params, headers) as sse:
        [message] = await sse.events(1)
    assert message.id == str(events[2].id)


async def test_empty_header_is_absent(alog, stream_app, client):
    stream, url = stream_app
    events = [await alog.publish(CART_42, "item_added", {"n": n}) for n in range(2)]
    params = {"topic": CART_42, "last_event_id": events[0].id}
    async with Connection(client, url, params, {"Last-Event-ID": ""}) as sse:
        [message] = await sse.events(1)
    assert message.id == str(events[1].id)


async def test_beyond_head_starts_at_head(alog, stream_app, client):
    """A restored database hands out ids the browser already saw: none may be skipped."""
    stream, url = stream_app
    head = await alog.publish(CART_42, "item_added", {"n": 0})
    async with Connection(client, url, {"topic": CART_42}, {"Last-Event-ID": str(head.id + 1000)}) as sse:
        await sse.next()  # retry hint
        position = await sse.next()
        assert position.id == str(head.id)
        assert not position.dispatched
        after_restore = await alog.publish(CART_42, "item_added", {"n": 1})
        [message] = await sse.events(1)
    assert message.id == str(after_restore.id)


# -- errors ---------------------------------------------------------------------------


async def test_other_cart_forbidden(stream_app, client):
    stream, url = stream_app
    response = await client.get(url, params={"topic": [CART_42, CART_7]})
    assert response.status_code == 403
    assert CART_7 in response.text
    assert stream.active == 0


@pytest.mark.parametrize("header", ["abc", "-3", "12.0", "1" * 25])
async def test_bad_header(stream_app, client, header):
    stream, url = stream_app
    response = await client.get(url, params={"topic": CART_42}, headers={"Last-Event-ID": header})
    assert response.status_code == 400
    assert "invalid Last-Event-ID header" in response.text
    assert response.headers["content-type"].startswith("text/plain")


async def test_bad_query(stream_app, client):
    stream, url = stream_app
    response = await client.get(url, params={"topic": CART_42, "last_event_id": "latest"})
    assert response.status_code == 400
    assert "invalid last_event_id query parameter 'latest'" in response.text


async def test_bad_topic(stream_app, client):
    stream, url = stream_app
    response = await client.get(url, params={"topic": ""})
    assert response.status_code == 400
    assert "topic" in response.text


async def test_no_topic(stream_app, client):
    stream, url = stream_app
    response = await client.get(url)
    assert response.status_code == 400
    assert "?topic=" in response.text


async def test_post_not_allowed(stream_app, client):
    stream, url = stream_app
    response = await client.post(url, params={"topic": CART_42})
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


async def test_async_authorize_picks_topics(alog, serve, client):
    seen = []

    async def my_cart(request, topics):
        seen.append(topics)
        if request.headers.get("x-user") != "42":
            raise HTTPException(401, "sign in first")
        return [CART_42]  # whatever was asked, the user's own cart

    stream = EventStream(alog, authorize=my_cart)
    url = await serve(stream)

    rejected = await client.get(url)
    assert rejected.status_code == 401
    assert rejected.text.strip() == "sign in first"

    mine = await alog.publish(CART_42, "item_added", {"n": 1})
    await alog.publish(CART_7, "item_added", {"n": 2})
    async with Connection(client, url, {"last_event_id": 0}, {"x-user": "42"}) as sse:
        [message] = await sse.events(1)
    assert message.id == str(mine.id)
    assert seen == [(), ()]


async def test_fastapi_route(alog, serve, client):
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()
    app.add_route("/events", EventStream(alog, authorize=shopper_42))
    url = await serve(app) + "/events"
    assert (await client.get(url, params={"topic": CART_7})).status_code == 403
    published = await alog.publish(CART_42, "item_added", {"n": 1})
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        [message] = await sse.events(1)
    assert message.id == str(published.id)


async def test_authorize_empty_forbidden(alog, serve, client):
    url = await serve(EventStream(alog, authorize=lambda request, topics: []))
    response = await client.get(url, params={"topic": PRODUCTS})
    assert response.status_code == 403


# -- keeping the connection ------------------------------------------------------------


async def test_heartbeat_comments(alog, serve, client):
    stream = EventStream(alog, authorize=shopper_42, heartbeat=0.2, retry=0.5)
    url = await serve(stream)
    async with Connection(client, url, {"topic": PRODUCTS, "last_event_id": 0}) as sse:
        hint = await sse.next()
        beats = [await sse.next() for _ in range(2)]
    assert hint.retry == 500
    assert [b.comments for b in beats] == [["heartbeat"], ["heartbeat"]]
    assert all(b.id is None and not b.dispatched for b in beats)


async def test_disconnect_closes_subscription(alog, stream_app, client, admin):
    stream, url = stream_app
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        await sse.next()
        await wait_until(lambda: alog.listener is not None and alog.listener.connected, what="listener")
        listener = alog.listener
        pid = listener.backend_pid
        assert stream.active == 1
        assert any(listener._interest.values())
    # The client is gone, with no event and no heartbeat due for 30 s: only
    # watching the connection can notice.
    await wait_until(lambda: stream.active == 0, what="the stream to end")
    await wait_until(lambda: alog.listener is None, what="the subscription to release the listener")
    assert not listener._interest
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row[0] == 0


async def test_many_disconnects_leak_nothing(alog, stream_app, client):
    stream, url = stream_app
    # Some clients leave while their subscription opens: the race that once
    # left streams running (a cancellation swallowed by asyncio.wait_for).
    for n in range(30):
        async with client.stream("GET", url, params={"topic": CART_42}) as response:
            assert response.status_code == 200
            if n % 2:
                await SSEStream(response).next()  # some close at once, some after the hint
    await wait_until(lambda: stream.active == 0, what="every stream to end")
    await wait_until(lambda: alog.listener is None, what="the listener to be released")


async def test_wait_keeps_cancellation():
    """A subscription's wait must not swallow a cancellation that meets its doorbell."""
    from eventlog._subscription import wait_event

    bell = asyncio.Event()
    waiting = asyncio.create_task(wait_event(bell, 30.0))
    await asyncio.sleep(0)  # one turn of the loop: the task now waits on the bell
    bell.set()
    await asyncio.sleep(0)  # the bell's waiter finishes; the wait has not resumed yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_stream_survives_backend_loss(alog, stream_app, client, admin):
    stream, url = stream_app
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        await sse.next()
        await wait_until(lambda: alog.listener is not None and alog.listener.connected, what="listener")
        first = await alog.publish(CART_42, "item_added", {"n": 1})
        await sse.events(1)
        terminated = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'eventlog%%' AND datname = current_database()"
        ).fetchall()
        assert len(terminated) >= 2  # the listener and the pool's connection
        # Another process publishes while the stream's connections are gone.
        [(second,)] = admin.execute(
            f'SELECT id FROM "{alog.schema}".publish_v1(%s, %s, %s, %s)',
            [[CART_42], "item_added", '{"n": 2}', "{}"],
        ).fetchall()
        [message] = await sse.events(1)
    assert int(message.id) == second > first.id


# -- payloads ------------------------------------------------------------------------


async def test_large_payload(alog, stream_app, client):
    stream, url = stream_app
    blob = "x" * (900 * 1024)
    big = await alog.publish(CART_42, "snapshot", {"blob": blob})
    small = await alog.publish(CART_42, "item_added", {"n": 1})
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        messages = await sse.events(2)
    assert json.loads(messages[0].data)["data"]["blob"] == blob
    assert [m.id for m in messages] == [str(big.id), str(small.id)]


async def test_multiline_payload(alog, serve, client):
    text = "line one\nline two\r\nline three\rend \u2028 ünïcode"
    stream = EventStream(alog, authorize=shopper_42)
    url = await serve(stream)
    published = await alog.publish(CART_42, "note\nwith break", {"text": text})
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        [message] = await sse.events(1)
    # A type with a line break cannot be an SSE event name: it comes as "message".
    assert message.type == "message"
    decoded = json.loads(message.data)
    assert decoded["data"]["text"] == text
    assert decoded["type"] == "note\nwith break"
    assert message.id == str(published.id)


async def test_serialize_raw_text(alog, serve, client):
    stream = EventStream(alog, authorize=shopper_42, serialize=lambda e: e.data["text"])
    url = await serve(stream)
    await alog.publish(CART_42, "note", {"text": "a\r\nb\rc\nd"})
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        [message] = await sse.events(1)
    assert message.data == "a\nb\nc\nd"


async def test_close_ends_streams(alog, stream_app, client):
    stream, url = stream_app
    async with Connection(client, url, {"topic": CART_42, "last_event_id": 0}) as sse:
        await sse.next()
        await wait_until(lambda: alog.listener is not None, what="the subscription to open")
        await stream.close()
        # The response ends cleanly, so a browser reconnects (to the next server).
        with pytest.raises(EOFError):
            while True:
                await sse.next()
    assert stream.active == 0
    await wait_until(lambda: alog.listener is None, what="the listener to be released")


async def test_unreachable_log_ends_stream(serve, client):
    import eventlog

    dead = eventlog.AsyncEventLog("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1.0)
    url = await serve(EventStream(dead, authorize=shopper_42))
    try:
        async with Connection(client, url, {"topic": CART_42}) as sse:
            hint = await sse.next()
            with pytest.raises(EOFError):
                await sse.next()
    finally:
        await dead.close()
    # A 200 that ends, not an error status: EventSource gives up on an error status.
    assert hint.retry == 2000


async def test_listener_beyond_fd_setsize(alog):
    """A server with a thousand open streams gives the listener a descriptor above 1023."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-file limit ({hard}) is too low to test descriptors above 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY else hard, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        async with alog.subscribe(CART_42, after=0) as subscription:
            await wait_until(lambda: alog.listener is not None and alog.listener.connected, what="listener")
            published = await alog.publish(CART_42, "item_added", {"n": 1})
            event = await subscription.next_event(timeout=WAIT)
            listener = alog.listener
            assert event is not None and event.id == published.id
            # select.select() fails on such a descriptor: the listener would reconnect in a loop.
            assert listener.connections == 1
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
