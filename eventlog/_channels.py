"""The mapping from a topic to its PostgreSQL NOTIFY channel.

Publishers (through the SQL function ``channel_v1`` that the migrations create) and
the listener (through `channel_for`) must agree on every channel name; a test
compares both on a table of awkward topics. The rules:

* A topic of ASCII letters, digits and ``_ . : / -`` whose channel fits in
  PostgreSQL's identifier limit (63 bytes) keeps its readable form:
  ``<schema>:<topic>``, for example ``eventlog:shop:products``.
* Any other topic (too long, multibyte, spaces, quotes, ...) maps to
  ``<schema>#<first 32 hex digits of sha256(topic as UTF-8)>``.

The ``:`` and ``#`` separators keep the two forms apart, and schema names never
contain either, so two topics share a channel only on a 128-bit hash collision.
Channel names are case-sensitive, so LISTEN always quotes them.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from psycopg import sql

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; pg_notify rejects longer names.
MAX_CHANNEL_BYTES = 63
HASH_HEX_DIGITS = 32

# Keep this pattern identical to the one in the SQL function `channel_v1`. It is
# applied with fullmatch: Python's `$` also matches before a trailing newline,
# PostgreSQL's does not, and "shop\n" must not get the readable channel of "shop".
_READABLE_TOPIC = re.compile(r"[A-Za-z0-9_.:/-]+", re.ASCII)


@lru_cache(maxsize=65536)
def channel_for(topic: str, schema: str = "eventlog") -> str:
    """Return the NOTIFY channel that stands for `topic` in the log of `schema`."""
    readable = f"{schema}:{topic}"
    if _READABLE_TOPIC.fullmatch(topic) and len(readable) <= MAX_CHANNEL_BYTES:
        return readable
    digest = hashlib.sha256(topic.encode("utf-8")).hexdigest()[:HASH_HEX_DIGITS]
    return f"{schema}#{digest}"


def listen_statement(channel: str) -> sql.Composed:
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


def unlisten_statement(channel: str) -> sql.Composed:
    return sql.SQL("UNLISTEN {}").format(sql.Identifier(channel))
