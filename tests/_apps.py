"""Support for the integration tests: throwaway application databases, and the
examples of docs/integration.md, which the tests run as written."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import sqlalchemy as sa

DOC = Path(__file__).resolve().parent.parent / "docs" / "integration.md"

# Each example is a fenced block right after an HTML comment that names it.
_EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)\n```\n", re.S)
_FENCE = re.compile(r"^```\w+$", re.M)


def doc_examples() -> dict[str, tuple[str, str]]:
    """Return {name: (language, code)} for every named example of the integration doc."""
    text = DOC.read_text(encoding="utf-8")
    examples = {m.group(1): (m.group(2), m.group(3)) for m in _EXAMPLE.finditer(text)}
    blocks = len(_FENCE.findall(text))
    assert blocks == len(examples), (
        f"{DOC.name} has {blocks} code blocks but {len(examples)} named examples: "
        "put <!-- example: NAME --> before each block and test it"
    )
    return examples


@contextlib.contextmanager
def app_database(admin: psycopg.Connection, database_url: str) -> Iterator[str]:
    """Create an empty database, as an application starts with; yield its libpq URL."""
    name = f"app_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
