"""1,050 concurrent SSE streams on one server process; see bench/sse_load.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the SSE endpoint needs the 'web' extra (starlette, uvicorn)")
pytest.importorskip("httpx", reason="the load's clients use httpx")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import sse_load  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_thousand_streams(database_url):
    result = sse_load.run(database_url, sse_load.Sizes())
    print(sse_load.render(result))
    assert result.complete_clients == result.sizes.streams, result.problems
    assert result.delivered == result.expected == 4000
    # Every client went away at once: the server closed every subscription.
    assert result.left_open == 0
    assert not result.problems
